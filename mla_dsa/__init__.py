"""mla-dsa: DeepSeek Sparse Attention (DSA) for any Multi-head Latent Attention (MLA) model, as a transformers plugin.

>>> import mla_dsa
>>> model = mla_dsa.MlaDsaForCausalLM.from_pretrained("path/to/checkpoint")  # transformers' loading
>>> model = mla_dsa.load_checkpoint("path/to/checkpoint")  # the same, with the package's checks (mla_dsa.loading)
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from . import attention, deepseek_format
from .conversion.convert import convert_checkpoint
from .conversion.source import ConversionError
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

__version__ = PAYLOAD_VERSION

# With the package imported, the Auto classes know our model type without trust_remote_code (checkpoints still carry
# the payload and auto_map for machines where mla-dsa is not installed).
AutoConfig.register(MlaDsaConfig.model_type, MlaDsaConfig, exist_ok=True)
AutoModel.register(MlaDsaConfig, MlaDsaModel, exist_ok=True)
AutoModelForCausalLM.register(MlaDsaConfig, MlaDsaForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(MlaDsaConfig, MlaDsaForSequenceClassification, exist_ok=True)
AutoModelForTokenClassification.register(MlaDsaConfig, MlaDsaForTokenClassification, exist_ok=True)
# The absorbed attention tuned for CPUs, in the registry where every checkpoint's code looks it up.
attention.register()
# DeepSeek-format config.json files (DeepseekV2/V3/V32, GLM-5, Kimi-K2, ...) read as ours.
deepseek_format.install()

# Training helpers import transformers' Trainer (and so accelerate): loaded on first use, not with the package.
_TRAINING_NAMES = ("prepare_indexer_training", "indexer_lora_config", "train_indexer",
                   "evaluate_indexer")  # fmt: skip


def __getattr__(name: str):
    if name in _TRAINING_NAMES:
        from . import training

        return getattr(training, name)
    raise AttributeError(f"module 'mla_dsa' has no attribute {name!r}")


__all__ = [
    *_TRAINING_NAMES,
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
    "upgrade_code",
    "use_onednn_linear",
]
