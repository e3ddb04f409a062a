"""mla-dsa: DeepSeek Sparse Attention (DSA) for any Multi-head Latent Attention (MLA) model, as a transformers plugin.

>>> import mla_dsa
>>> model = mla_dsa.MlaDsaForCausalLM.from_pretrained("path/to/checkpoint")  # transformers' loading
>>> model = mla_dsa.load_checkpoint("path/to/checkpoint")  # the same, with the package's checks (mla_dsa.loading)
"""

import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what `_NAMES` loads on first use, for type checkers and editors (as transformers' own __init__)
    from .conversion import ConversionError
    from .conversion.convert import convert_checkpoint
    from .conversion.upgrade import upgrade_code
    from .cpu_linear import use_onednn_linear
    from .indexer_loss import IndexerLoss
    from .loading import load_checkpoint
    from .modeling.cache_mla_dsa import MlaDsaCache, MlaDsaCacheLayer
    from .modeling.configuration_mla_dsa import PAYLOAD_VERSION, MlaDsaConfig
    from .modeling.modeling_mla_dsa import (
        MlaDsaForCausalLM,
        MlaDsaForSequenceClassification,
        MlaDsaForTokenClassification,
        MlaDsaModel,
        MlaDsaPreTrainedModel,
    )
    from .training import evaluate_indexer, indexer_lora_config, prepare_indexer_training, train_indexer

# The public names, loaded on first use: the command line (`mla-dsa --help`, an argument error) answers before torch
# and transformers load (4 s), and the training helpers import transformers' Trainer (and so accelerate).
_NAMES = {
    "ConversionError": ".conversion",
    "convert_checkpoint": ".conversion.convert",
    "upgrade_code": ".conversion.upgrade",
    "use_onednn_linear": ".cpu_linear",
    "IndexerLoss": ".indexer_loss",
    "load_checkpoint": ".loading",
    "MlaDsaCache": ".modeling.cache_mla_dsa",
    "MlaDsaCacheLayer": ".modeling.cache_mla_dsa",
    "PAYLOAD_VERSION": ".modeling.configuration_mla_dsa",
    "MlaDsaConfig": ".modeling.configuration_mla_dsa",
    **dict.fromkeys(("MlaDsaForCausalLM", "MlaDsaForSequenceClassification", "MlaDsaForTokenClassification",
                     "MlaDsaModel", "MlaDsaPreTrainedModel"), ".modeling.modeling_mla_dsa"),
    **dict.fromkeys(("prepare_indexer_training", "indexer_lora_config", "train_indexer", "evaluate_indexer"),
                    ".training"),
}  # fmt: skip


def __getattr__(name: str):
    if name == "__version__":
        name = "PAYLOAD_VERSION"
    if name in _NAMES:
        from importlib import import_module

        return getattr(import_module(_NAMES[name], __name__), name)
    raise AttributeError(f"module 'mla_dsa' has no attribute {name!r}")


def register_with_transformers() -> None:
    """Make transformers know our model type, attention and DeepSeek-format configs (idempotent).

    With it, the Auto classes load our checkpoints without trust_remote_code (they still carry the payload and
    auto_map for machines where mla-dsa is not installed), the absorbed attention tuned for CPUs takes the registry
    entry every checkpoint's code looks up, and DeepSeek-format config.json files (DeepseekV2/V3/V32, GLM-5,
    Kimi-K2, ...) read as ours. `import mla_dsa` calls it; the command line calls it once its arguments parse.
    """
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    from . import attention, deepseek_format
    from .modeling import modeling_mla_dsa as modeling
    from .modeling.configuration_mla_dsa import MlaDsaConfig

    AutoConfig.register(MlaDsaConfig.model_type, MlaDsaConfig, exist_ok=True)
    AutoModel.register(MlaDsaConfig, modeling.MlaDsaModel, exist_ok=True)
    AutoModelForCausalLM.register(MlaDsaConfig, modeling.MlaDsaForCausalLM, exist_ok=True)
    AutoModelForSequenceClassification.register(MlaDsaConfig, modeling.MlaDsaForSequenceClassification, exist_ok=True)
    AutoModelForTokenClassification.register(MlaDsaConfig, modeling.MlaDsaForTokenClassification, exist_ok=True)
    attention.register()
    deepseek_format.install()


def _started_as_the_command() -> bool:
    """This process is `mla-dsa ...` or `python -m mla_dsa ...` (then `sys.argv[0]` reads "-m" while we import)."""
    started = getattr(sys, "argv", None) or [""]  # an embedded interpreter may have none
    if Path(started[0]).stem == "mla-dsa":
        return True
    argv = getattr(sys, "orig_argv", [])
    return started[0] == "-m" and "-m" in argv and argv[argv.index("-m") + 1 :][:1] == ["mla_dsa"]


if not _started_as_the_command():
    register_with_transformers()

__all__ = [
    "register_with_transformers",
    "prepare_indexer_training",
    "indexer_lora_config",
    "train_indexer",
    "evaluate_indexer",
    "ConversionError",
    "convert_checkpoint",
    "IndexerLoss",
    "load_checkpoint",
    "MlaDsaCache",
    "MlaDsaCacheLayer",
    "MlaDsaConfig",
    "MlaDsaForCausalLM",
    "MlaDsaForSequenceClassification",
    "MlaDsaForTokenClassification",
    "MlaDsaModel",
    "MlaDsaPreTrainedModel",
    "PAYLOAD_VERSION",
    "upgrade_code",
    "use_onednn_linear",
]
