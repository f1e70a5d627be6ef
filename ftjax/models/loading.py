"""`load_pretrained`: a Hugging Face directory, a GGUF file or a hub name -> (model, params, tokenizer, config).

Weights are read with numpy (safetensors, sharded index included) or the `gguf` package; never torch.
"""
import dataclasses
import json
import logging
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftjax.errors import ConfigError, MissingFileError, ModelError
from ftjax.models import bert, convert, gguf_io, llama, packaged

SUPPORTED = {  # config.json model_type -> family (decoders: docs/models.md)
    'llama': 'llama', 'mistral': 'llama', 'qwen2': 'llama', 'qwen3': 'llama', 'phi3': 'llama',
    'gemma2': 'llama', 'gemma3_text': 'llama',
    'qwen3_moe': 'llama', 'qwen2_moe': 'llama', 'mixtral': 'llama', 'olmoe': 'llama', 'granitemoe': 'llama',
    'bert': 'bert', 'roberta': 'bert',
}
DATA_PREFIXES = ('shared:', 'synthetic:')  # ftjax.data.locations' names: data, never a model
WEIGHT_PATTERNS = ['*.json', '*.safetensors', '*.model', '*.txt', '*.jinja', 'tokenizer*']


@dataclasses.dataclass
class Pretrained:
    """What `load_pretrained` returns; unpacks as `model, params, tokenizer, config = ...`."""
    model: nn.Module
    params: Any
    tokenizer: Any
    config: Any  # ftjax's LlamaConfig / BertConfig
    hf_config: dict = dataclasses.field(default_factory=dict)  # the source config.json, for export
    path: str = ''

    def __iter__(self):
        return iter((self.model, self.params, self.tokenizer, self.config))


def build_model(cfg):
    return llama.Llama(cfg) if cfg.family == 'llama' else bert.Bert(cfg)


def dummy_inputs(cfg, batch=1, seq=8):
    return (jnp.zeros((batch, seq), jnp.int32),)


def abstract_variables(model, batch=1, seq=8):
    """Shapes (and logical-axis boxes) of `model.init` without allocating anything."""
    return jax.eval_shape(lambda: model.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)},
                                             *dummy_inputs(model.cfg, batch, seq)))


def init_params(model, rng, batch=1, seq=8):
    return nn.unbox(model.init({'params': rng, 'dropout': rng}, *dummy_inputs(model.cfg, batch, seq)))['params']


REQUIRED_KEYS = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads')


def family_of(hf_config, source):
    """'llama' or 'bert' for a config.json dict; a ModelError naming `source` for anything ftjax cannot build."""
    if not isinstance(hf_config, dict):
        raise ModelError(f"{source}: config.json holds a {type(hf_config).__name__}, not a JSON object; a Hugging "
                         f"Face model directory's config.json is one object ({{\"model_type\": ...}}).")
    model_type = hf_config.get('model_type')
    family = SUPPORTED.get(model_type)
    if family is None:
        if model_type is None and 'model' in hf_config and 'train' in hf_config:  # a run's config.json
            raise ModelError(f"{source} is a ftjax training run's workdir, not a model: start from it with "
                             f"--config.model.adapter={source} (and its base as model.path), or generate with "
                             f"`ftjax generate --workdir={source}`.")
        hint = (" (the multimodal Gemma 3; its text-only checkpoints, e.g. gemma-3-270m / -1b, are "
                "'gemma3_text')" if model_type == 'gemma3' else '')
        raise ModelError(f"{source}: model_type {model_type!r}{hint} is not supported. Supported architectures: "
                         f"{', '.join(sorted(SUPPORTED))}.")
    bad = [k for k in REQUIRED_KEYS if not isinstance(hf_config.get(k), int) or hf_config.get(k) < 1]
    if bad:
        raise ModelError(f"{source}: config.json ({model_type}) lacks a positive integer {bad[0]!r}"
                         f"{f' (also {bad[1:]})' if bad[1:] else ''}; it is incomplete or not a model config. "
                         f"Save the model again with save_pretrained.")
    return family


def config_from_hf(hf_config, source, *, num_labels=None, pooling='cls', **runtime):
    """ftjax's LlamaConfig / BertConfig from a config.json dict; `runtime`: dtype, param_dtype, remat, scan_unroll."""
    family = family_of(hf_config, source)
    if family == 'llama' and num_labels:
        raise ConfigError(f"config.model.num_labels={num_labels} is for encoders (BERT/RoBERTa); {source} is a "
                          f"decoder ({hf_config['model_type']}), tuned as a language model: leave num_labels unset.")
    try:
        if family == 'llama':
            return llama.LlamaConfig.from_hf(hf_config, **runtime)
        return bert.BertConfig.from_hf(hf_config, num_labels=num_labels, pooling=pooling, **runtime)
    except ModelError as e:  # a field of config.json this family cannot build: name the model too
        raise ModelError(f'{source}: {e}') from None


def load_pretrained(path: str, dtype=jnp.float32, *, compute_dtype=None, num_labels: Optional[int] = None,
                    pooling: str = 'cls', remat: str = 'none', scan_unroll: int = 1, seed: int = 0,
                    revision: Optional[str] = None) -> Pretrained:
    """Loads pretrained weights into an ftjax module (a PEFT adapter on top: `ftjax.load_pretrained(adapter=)`).

    path: a HF directory (config.json, *.safetensors, tokenizer files), a `.gguf` file, or a hub
      name such as 'HuggingFaceTB/SmolLM2-135M-Instruct' (needs a network or the local HF cache).
    dtype: storage dtype of the parameters; compute_dtype defaults to it.
    num_labels: for encoders, adds a sequence-classification head (new unless the checkpoint has one).
    """
    runtime = dict(dtype=compute_dtype or dtype, param_dtype=dtype, remat=remat, scan_unroll=scan_unroll)
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ConfigError(f"model.path={path!r}: no model given; pass a Hugging Face directory, a .gguf file, a hub "
                          f"name or packaged:NAME (--config.model.path for training, --model for generate).")
    path = packaged.resolve(str(path))  # 'packaged:smollm2' -> the installed file
    if str(path).endswith('.gguf'):
        if not os.path.exists(path):
            raise MissingFileError(f"model.path={path!r}: the GGUF file does not exist; pass an existing .gguf "
                                   f"file, a Hugging Face directory or a hub name (--config.model.path for "
                                   f"`ftjax train`, --model for `ftjax generate`).")
        hf_config, state_dict, tokenizer = gguf_io.read_gguf(path)
        hf_config = hf_config.to_dict() if hasattr(hf_config, 'to_dict') else dict(hf_config)
        cfg = config_from_hf(hf_config, path, num_labels=num_labels, pooling=pooling, **runtime)
    else:
        path = resolve(path, revision)
        hf_config = read_config(path)
        # an unsupported or incomplete config.json (or num_labels on a decoder): said before any weights are read
        cfg = config_from_hf(hf_config, path, num_labels=num_labels, pooling=pooling, **runtime)
        state_dict = read_safetensors(path)
        tokenizer = read_tokenizer(path)
    source = path
    family = cfg.family
    model = build_model(cfg)
    expected = nn.unbox(abstract_variables(model))['params']
    rows = convert.table(cfg, state_dict.keys())
    head_rows = convert.bert_head_table(cfg) if family == 'bert' and num_labels else []
    # Reuse what the checkpoint has: a whole ...ForSequenceClassification head with matching labels,
    # or just the pretrained pooler of a bare BertModel (as transformers does); the rest starts fresh.
    for suffix in ('weight', 'bias'):  # a bare BertModel stores its pooler without the 'bert.' prefix
        if f'pooler.dense.{suffix}' in state_dict and cfg.model_type == 'bert':
            state_dict.setdefault(f'bert.pooler.dense.{suffix}', state_dict[f'pooler.dense.{suffix}'])
    loadable = [r for r in head_rows if r[1] in state_dict and (
        r[0][0] != 'classifier' or np.shape(state_dict[r[1]])[0] == num_labels)]
    if any(r[0][0] == 'classifier' for r in loadable) and len(loadable) < len(head_rows):
        loadable = [r for r in loadable if r[0][0] != 'classifier']  # no half-loaded head
    params = convert.hf_to_params(state_dict, rows + loadable, expected, cfg.num_layers, source)
    fresh_parts = sorted({r[0][0] for r in head_rows} - {r[0][0] for r in loadable})
    if fresh_parts:
        fresh = init_params(model, jax.random.key(seed))
        params.update({k: jax.device_get(fresh[k]) for k in fresh_parts})
        logging.info('Initialised new %s for a %d-label head (%s pooling).', '+'.join(fresh_parts), num_labels,
                     pooling)
    # Host (numpy) arrays: `ftjax.sharding.place` puts each shard straight onto its device.
    params = jax.tree.map(lambda x: np.asarray(x).astype(jnp.dtype(dtype)), params)
    return Pretrained(model, params, tokenizer, cfg, hf_config, str(path))


def resolve(path: str, revision=None) -> str:
    """A local directory as is; otherwise a hub repo id, downloaded (or found in the HF cache). Anything else
    (a missing path, a file that is not a .gguf, a URL, a data location, a malformed hub name) is a one-line
    error naming model.path."""
    where = f'model.path={path!r}'
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ModelError(f"{where} is a file, not a model: pass the Hugging Face directory holding config.json "
                         f"and *.safetensors, or a .gguf file.")
    if '://' in path:
        raise ModelError(f"{where} is a URL; ftjax does not download URLs: pass a hub name like 'org/model' "
                         f"(fetched into the Hugging Face cache), a local directory or a .gguf file.")
    if path.startswith(DATA_PREFIXES):
        raise ModelError(f"{where}: {path.split(':')[0]}: names a data file (data.path), not a model; pass a Hugging "
                         f"Face directory, a .gguf file, a hub name or packaged:NAME.")
    looks_local = path.startswith(('.', '/')) or path.count('/') != 1 or os.path.exists(os.path.dirname(path))
    if looks_local:
        raise MissingFileError(f"{where} does not exist. Pass a Hugging Face directory "
                               f"(config.json + *.safetensors), a .gguf file, or a hub name like 'org/model'.")
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id
    try:
        validate_repo_id(path)
    except HFValidationError:
        raise ModelError(f"{where} is neither a local path nor a valid hub name ('org/model': letters, digits, "
                         f"'-', '_', '.'); check the spelling.") from None
    try:
        return huggingface_hub.snapshot_download(path, revision=revision, allow_patterns=WEIGHT_PATTERNS)
    except Exception as e:  # offline, unknown repo, no access: all of them the user's to fix
        raise ModelError(f"{where}: could not fetch it from the Hugging Face hub ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}). Without a network, pass a "
                         f"local directory or a .gguf file.") from e


def read_config(path):
    """The config.json of a model directory, as a dict."""
    f = os.path.join(path, 'config.json')
    if not os.path.exists(f):
        found = sorted(os.listdir(path))[:8]
        raise MissingFileError(f"model.path={path!r}: no config.json (the directory holds "
                               f"{found or 'nothing'}); a Hugging Face model directory needs config.json and "
                               f"*.safetensors weights.")
    try:
        with open(f) as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{f}: not valid JSON ({e}); the file is corrupt: download or save the model again.") from e


def read_safetensors(path):
    """All tensors of a directory as numpy arrays: model.safetensors or a sharded index."""
    from safetensors.numpy import load_file
    index = os.path.join(path, 'model.safetensors.index.json')
    if os.path.exists(index):
        try:
            with open(index) as fh:
                files = sorted(set(json.load(fh)['weight_map'].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ModelError(f"{index}: not a safetensors index ({type(e).__name__}: {e}); it needs a "
                             f"'weight_map' of tensor -> shard file. Download or save the model again.") from e
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith('.safetensors'))
    if not files:
        extra = ' (found PyTorch .bin weights: re-save them with save_pretrained(..., safe_serialization=True))' \
            if any(f.endswith('.bin') for f in os.listdir(path)) else ''
        raise MissingFileError(f"model.path={path!r}: no *.safetensors weights{extra}.")
    state = {}
    for name in files:
        f = os.path.join(path, name)
        if not os.path.exists(f):
            raise MissingFileError(f"{index}: names the shard {name!r}, which is missing; download it again.")
        try:
            state.update(load_file(f))
        except Exception as e:  # safetensors raises its own SafetensorError (and OSError) for a bad file
            raise ModelError(f"{f}: cannot read the safetensors file ({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); it is truncated or "
                             f"corrupt. Download or save it again.") from e
    return state


def require_tokenizer(pre, where):
    """`pre` when it has a tokenizer; else a ModelError naming `where` (e.g. "config.model.path='dir'"): training,
    generation and evaluation all tokenize text."""
    if pre.tokenizer is None:
        raise ModelError(f"{where}: no usable tokenizer (tokenizer.json / tokenizer_config.json, or the GGUF's "
                         f"tokenizer.ggml.* metadata); ftjax tokenizes its data and prompts with the model's own: copy "
                         f"the tokenizer files of the model's source into {pre.path}.")
    return pre


def read_tokenizer(path):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        logging.warning('%s: no usable tokenizer (%s); continuing without one.', path, e)
        return None
