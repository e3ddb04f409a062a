"""mla-dsa: DeepSeek Sparse Attention (DSA) for any Multi-head Latent Attention (MLA) model, as a transformers plugin.

>>> import mla_dsa
>>> model = mla_dsa.MlaDsaForCausalLM.from_pretrained("path/to/checkpoint")
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .conversion.convert import convert_checkpoint
from .conversion.source import ConversionError
from .conversion.upgrade import upgrade_code
from .modeling.cache_mla_dsa import MlaDsaCache, MlaDsaCacheLayer
from .modeling.configuration_mla_dsa import PAYLOAD_VERSION, MlaDsaConfig
from .modeling.modeling_mla_dsa import MlaDsaForCausalLM, MlaDsaModel, MlaDsaPreTrainedModel

__version__ = PAYLOAD_VERSION

# With the package imported, the Auto classes know our model type without trust_remote_code (checkpoints still carry
# the payload and auto_map for machines where mla-dsa is not installed).
AutoConfig.register(MlaDsaConfig.model_type, MlaDsaConfig, exist_ok=True)
AutoModel.register(MlaDsaConfig, MlaDsaModel, exist_ok=True)
AutoModelForCausalLM.register(MlaDsaConfig, MlaDsaForCausalLM, exist_ok=True)

__all__ = [
    "ConversionError",
    "convert_checkpoint",
    "MlaDsaCache",
    "MlaDsaCacheLayer",
    "MlaDsaConfig",
    "MlaDsaForCausalLM",
    "MlaDsaModel",
    "MlaDsaPreTrainedModel",
    "upgrade_code",
]
