"""The command line answers `--help` and argument errors before torch and transformers load (they take ~4 s), and
registers our model type with transformers once its arguments parse, as `import mla_dsa` does."""

import subprocess
import sys
from pathlib import Path

import pytest

from mla_dsa import cli
from mla_dsa.conversion.export import EXPORT_FORMATS
from mla_dsa.conversion.indexer_init import INDEXER_INITS

# The console script pip writes beside the interpreter (README's `pip install -e .`), and `python -m mla_dsa`.
SCRIPT = Path(sys.executable).parent / "mla-dsa"
STARTS = {"mla-dsa": [sys.executable, str(SCRIPT)], "python -m mla_dsa": [sys.executable, "-m", "mla_dsa"]}


def loaded_packages(command: list[str]) -> set[str]:
    """The top-level packages a command imports, from `python -X importtime`."""
    result = subprocess.run([command[0], "-X", "importtime", *command[1:]], capture_output=True, text=True, timeout=60)
    rows = [line.split("|")[-1] for line in result.stderr.splitlines() if line.startswith("import time:")]
    return {row.strip().split(".")[0] for row in rows[1:]}  # the first row is the header


@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("argv", [["--help"], ["convert", "--help"], ["convert"], ["train-indexer", "--lr", "-1"]])
def test_help_and_argument_errors_load_neither_torch_nor_transformers(start, argv):
    assert SCRIPT.exists(), f"{SCRIPT}: the console script `pip install -e .` writes"
    packages = loaded_packages([*STARTS[start], *argv])
    assert "mla_dsa" in packages and "argparse" in packages  # it ran
    assert not packages & {"torch", "transformers", "safetensors"}, sorted(packages)


@pytest.mark.slow  # a fresh process importing torch and transformers: ~5 s
def test_the_command_registers_with_transformers_once_its_arguments_parse():
    program = """
import sys
sys.argv[0] = "mla-dsa"
import mla_dsa
assert "transformers" not in sys.modules
from mla_dsa.cli import main
code = main(["upgrade-code", "/no/such/checkpoint"])
from transformers import AttentionInterface
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from mla_dsa.attention import cpu_absorbed_attention
print(code, "mla_dsa" in CONFIG_MAPPING, AttentionInterface()["mla_dsa_absorbed"] is cpu_absorbed_attention)
"""
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["1", "True", "True"], result.stderr
    assert "/no/such/checkpoint" in result.stderr


@pytest.mark.slow  # fresh processes importing torch and transformers: ~5 s each
@pytest.mark.parametrize("argv", ["", "del sys.argv; "], ids=["script", "embedded-without-argv"])
def test_import_mla_dsa_registers_with_transformers(argv):
    program = f"import sys; {argv}import mla_dsa; from transformers import AutoConfig; "
    program += "print(AutoConfig.for_model('mla_dsa'))"
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert "MlaDsaConfig" in result.stdout, result.stderr


def test_the_command_lines_choices_are_the_conversions():
    assert cli.EXPORT_FORMATS == EXPORT_FORMATS and cli.INDEXER_INITS == INDEXER_INITS
