"""What a model is trained for, and its output head, for any family: what the train step needs to know.

  task_of(cfg)                 'lm' (decoders) or 'classification' (encoders with `num_labels`)
  lm_head_kernel(params, cfg)  the output projection [embed, vocab] of a decoder (its loss is chunked
                               over the vocabulary, so the step takes hidden states and this kernel)
"""
from ftjax.errors import ConfigError, ModelError
from ftjax.models import llama, quantize

TASKS = ('lm', 'classification')


def task_of(cfg) -> str:
    """The training objective of a model config (`cfg.task`); an encoder without a head has none."""
    task = cfg.task
    if task not in TASKS:
        raise ConfigError("An encoder without a classification head has no training objective here: set "
                          "config.model.num_labels (load_pretrained(..., num_labels=N)).")
    return task


def lm_head_kernel(params, cfg):
    """The output projection of a decoder as [embed, vocab] (the transposed embedding when tied); a quantized
    one (`ftjax.models.quantize`) dequantized in the compute dtype, for the loss of this step only."""
    if cfg.family == 'llama':
        head = llama.lm_head_kernel(params, cfg)
        return quantize.dequantize(head, cfg.dtype) if quantize.is_quantized(head) else head
    raise ModelError(f"A {cfg.family} model has no language-model head; only decoders (Llama family) do.")
