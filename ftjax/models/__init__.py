"""Flax models and pretrained-weight loading."""
from ftjax.models.adapters import LoraSpec
from ftjax.models.bert import Bert, BertConfig
from ftjax.models.heads import lm_head_kernel, task_of
from ftjax.models.llama import Llama, LlamaConfig, init_cache
from ftjax.models.loading import (Pretrained, abstract_variables, build_model, init_params,
                                  load_pretrained)

__all__ = ['Bert', 'BertConfig', 'Llama', 'LlamaConfig', 'LoraSpec', 'Pretrained', 'abstract_variables',
           'build_model', 'init_cache', 'init_params', 'lm_head_kernel', 'load_pretrained', 'task_of']
