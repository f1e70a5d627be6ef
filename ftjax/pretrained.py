"""`ftjax.load_pretrained`: a base model (`ftjax.models.load_pretrained`), optionally with a `peft` adapter on top.

  model, params, tokenizer, config = pre = ftjax.load_pretrained('dir_or_file.gguf_or_hub_name', adapter=None)
"""
from typing import Optional

import jax.numpy as jnp

from ftjax.models import loading
from ftjax.models.loading import Pretrained
from ftjax.peft.adapter_io import load_peft_adapter


def load_pretrained(path: str, dtype=jnp.float32, *, compute_dtype=None, num_labels: Optional[int] = None,
                    pooling: str = 'cls', remat: str = 'none', scan_unroll: int = 1, seed: int = 0,
                    adapter: Optional[str] = None, revision: Optional[str] = None) -> Pretrained:
    """Loads pretrained weights into an ftjax module (see `ftjax.models.loading.load_pretrained`).

    adapter: a PEFT LoRA adapter directory to add on top (see `ftjax.peft.adapter_io.load_peft_adapter`).
    """
    pre = loading.load_pretrained(path, dtype, compute_dtype=compute_dtype, num_labels=num_labels, pooling=pooling,
                                  remat=remat, scan_unroll=scan_unroll, seed=seed, revision=revision)
    return load_peft_adapter(pre, adapter) if adapter else pre
