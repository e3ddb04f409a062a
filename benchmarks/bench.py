"""Decode and prefill benchmark vs transformers' DeepseekV32: see `mla_dsa/bench.py` (also `mla-dsa bench`).

python benchmarks/bench.py [--contexts 4096 16384 65536] [--out bench-out]
"""

from mla_dsa.bench import main

if __name__ == "__main__":
    main()
