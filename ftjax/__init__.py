"""ftjax: fine-tuning pretrained models (full, partial, LoRA/DoRA) in JAX/Flax."""
__version__ = '0.1.0'


def __getattr__(name):  # lazy, so `import ftjax` stays cheap
    if name == 'load_pretrained':
        from ftjax.models import load_pretrained
        return load_pretrained
    if name == 'generate':
        from ftjax.generate import generate
        return generate
    raise AttributeError(name)
