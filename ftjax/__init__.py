"""ftjax: fine-tuning pretrained models (full, partial, LoRA/DoRA) in JAX/Flax.

  model, params, tokenizer, config = pre = ftjax.load_pretrained('dir_or_file.gguf_or_hub_name')
  new_ids = ftjax.generate(pre, prompt_ids, max_new_tokens=32)

Both are plain functions (`ftjax.pretrained.load_pretrained`, `ftjax.decoding.generate`). The command
line `python -m ftjax.generate` lives in the module ftjax/generate.py, which nothing in ftjax imports
(importing it would rebind the attribute `ftjax.generate` to that module). The module graph:
docs/architecture.md.
"""
from ftjax.decoding import generate
from ftjax.pretrained import load_pretrained

__version__ = '0.1.0'
__all__ = ['generate', 'load_pretrained']
