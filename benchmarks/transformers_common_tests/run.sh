#!/bin/bash
# usage: run.sh NAME TESTPATH [extra pytest args]
cd /tmp/common_tests
NAME=$1; shift; TP=$1; shift
export PYTHONPATH=/tmp/common_tests:/tmp/common_tests/pydeps
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export RUN_TENSOR_PARALLEL_TESTS=0 RUN_EXPERT_PARALLEL_TESTS=0 RUN_FSDP_TESTS=0
timeout 5400 python3 -m pytest -p no:cacheprovider -q -rfEs --durations=25 -o junit_family=xunit1 \
  --junitxml=results/$NAME.xml "$TP" "$@" > results/$NAME.log 2>&1
echo "rc=$?" >> results/$NAME.log
