"""mla-dsa: DeepSeek Sparse Attention (DSA) for any Multi-head Latent Attention (MLA) model, as a transformers plugin.

>>> import mla_dsa
>>> model = mla_dsa.MlaDsaForCausalLM.from_pretrained("path/to/checkpoint")
"""

from .conversion.convert import convert_checkpoint
from .conversion.source import ConversionError
from .modeling.cache_mla_dsa import MlaDsaCache, MlaDsaCacheLayer
from .modeling.configuration_mla_dsa import MlaDsaConfig
from .modeling.modeling_mla_dsa import MlaDsaForCausalLM, MlaDsaModel, MlaDsaPreTrainedModel

__version__ = "0.1.0"

__all__ = [
    "ConversionError",
    "convert_checkpoint",
    "MlaDsaCache",
    "MlaDsaCacheLayer",
    "MlaDsaConfig",
    "MlaDsaForCausalLM",
    "MlaDsaModel",
    "MlaDsaPreTrainedModel",
]
