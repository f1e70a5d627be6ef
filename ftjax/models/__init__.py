"""Flax models and pretrained-weight loading."""
from ftjax.models.bert import Bert, BertConfig
from ftjax.models.layers import LoraSpec
from ftjax.models.llama import Llama, LlamaConfig, init_cache, lm_head_kernel
from ftjax.models.loading import (Pretrained, abstract_variables, build_model, init_params,
                                  load_pretrained)

__all__ = ['Bert', 'BertConfig', 'Llama', 'LlamaConfig', 'LoraSpec', 'Pretrained', 'abstract_variables',
           'build_model', 'init_cache', 'init_params', 'lm_head_kernel', 'load_pretrained']
