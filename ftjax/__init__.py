"""ftjax: fine-tuning pretrained models (full, partial, LoRA/DoRA) in JAX/Flax.

  model, params, tokenizer, config = pre = ftjax.load_pretrained('dir_or_file.gguf_or_hub_name')
  new_ids = ftjax.generate(pre, prompt_ids, max_new_tokens=32)

Both are plain functions, whatever modules a program imports: no module is named like them. The commands
(`python -m ftjax <verb>`, or the `ftjax` console script) live in ftjax/cli/. The module graph:
docs/architecture.md.
"""
from ftjax.infer import generate
from ftjax.pretrained import load_pretrained

__version__ = '0.1.0'
__all__ = ['generate', 'load_pretrained']
