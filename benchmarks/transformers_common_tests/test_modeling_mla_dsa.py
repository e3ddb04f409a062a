"""transformers' common model tests (ModelTesterMixin and GenerationTesterMixin through CausalLMModelTest) on
mla_dsa's classes beside transformers' DeepseekV32, with the DeepseekV32 tester's small shapes and class attributes
and no model-specific skips on either side (DeepseekV32's own test file skips 42 of these). See README.md here for
where transformers' test files come from and how to run it.

transformers' common tests pick labels, base models and heads by name from the static `*_MAPPING_NAMES` tables of
`transformers.models.auto.modeling_auto`, where a plugin is never listed: our class names are added there (model
type "mla_dsa"; the Auto classes still resolve through mla_dsa's own registration). The *Topk4* classes make both
sides select 4 keys (index_topk 4, 4 indexer heads of 64): the tester's default index_topk 2048 exceeds its 7-token
sequences, so there selection never runs.
"""

import unittest

from transformers import DeepseekV32ForCausalLM, DeepseekV32Model
from transformers.models.auto import modeling_auto
from transformers.testing_utils import require_torch

from mla_dsa import (
    MlaDsaConfig,
    MlaDsaForCausalLM,
    MlaDsaForSequenceClassification,
    MlaDsaForTokenClassification,
    MlaDsaModel,
)

from ...causal_lm_tester import CausalLMModelTest, CausalLMModelTester

modeling_auto.MODEL_MAPPING_NAMES["mla_dsa"] = "MlaDsaModel"
modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES["mla_dsa"] = "MlaDsaForCausalLM"
modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES["mla_dsa"] = "MlaDsaForSequenceClassification"
modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES["mla_dsa"] = "MlaDsaForTokenClassification"

# DeepseekV32ModelTester's arguments; everything else is CausalLMModelTester's default.
DSV32_TESTER_KWARGS = dict(n_routed_experts=8, kv_lora_rank=32, q_lora_rank=16, qk_nope_head_dim=64,
                           qk_rope_head_dim=64, first_k_dense_replace=1, n_group=1, topk_group=1)  # fmt: skip
# index_head_dim >= qk_rope_head_dim (64): ours refuses less, DeepseekV32 fails in its indexer's split.
TOPK4 = dict(index_topk=4, index_head_dim=64, index_n_heads=4)


class MlaDsaModelTester(CausalLMModelTester):
    base_model_class = MlaDsaModel
    config_class = MlaDsaConfig
    causal_lm_class = MlaDsaForCausalLM
    sequence_classification_class = MlaDsaForSequenceClassification
    token_classification_class = MlaDsaForTokenClassification

    def __init__(self, parent, **kwargs):
        super().__init__(parent=parent)
        for key, value in {**DSV32_TESTER_KWARGS, **kwargs}.items():
            setattr(self, key, value)


class DeepseekV32UnskippedTester(CausalLMModelTester):
    base_model_class = DeepseekV32Model

    def __init__(self, parent, **kwargs):
        super().__init__(parent=parent)
        for key, value in {**DSV32_TESTER_KWARGS, **kwargs}.items():
            setattr(self, key, value)


class MlaDsaTopk4Tester(MlaDsaModelTester):
    def __init__(self, parent):
        super().__init__(parent, **TOPK4)


class DeepseekV32Topk4Tester(DeepseekV32UnskippedTester):
    def __init__(self, parent):
        super().__init__(parent, **TOPK4)


@require_torch
class MlaDsaModelTest(CausalLMModelTest, unittest.TestCase):
    fx_compatible = False  # DeepseekV32ModelTest's class attributes, without its skips
    test_torchscript = False
    test_all_params_have_gradient = False
    model_tester_class = MlaDsaModelTester
    model_split_percents = [0.5, 0.7, 0.8]
    _torch_compile_train_cls = MlaDsaForCausalLM
    # test_can_init_all_missing_weights skips files without a "# Copyright <year>" line: run it anyway
    test_can_init_all_missing_weights_before_2023 = True


@require_torch
class DeepseekV32UnskippedTest(CausalLMModelTest, unittest.TestCase):
    pipeline_model_mapping = {"feature-extraction": DeepseekV32Model, "text-generation": DeepseekV32ForCausalLM}
    fx_compatible = False
    test_torchscript = False
    test_all_params_have_gradient = False
    model_tester_class = DeepseekV32UnskippedTester
    model_split_percents = [0.5, 0.7, 0.8]
    _torch_compile_train_cls = DeepseekV32ForCausalLM


class MlaDsaTopk4Test(MlaDsaModelTest):
    model_tester_class = MlaDsaTopk4Tester


class DeepseekV32Topk4Test(DeepseekV32UnskippedTest):
    model_tester_class = DeepseekV32Topk4Tester
