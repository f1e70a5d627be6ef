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

from ftjax.errors import MissingFileError, ModelError
from ftjax.models import bert, convert, gguf_io, llama, packaged

SUPPORTED = {  # config.json model_type -> family (decoders: docs/models.md)
    'llama': 'llama', 'mistral': 'llama', 'qwen2': 'llama', 'qwen3': 'llama', 'phi3': 'llama',
    'gemma2': 'llama', 'gemma3_text': 'llama',
    'bert': 'bert', 'roberta': 'bert',
}
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


def config_from_hf(hf_config, source, *, num_labels=None, pooling='cls', **runtime):
    """ftjax's LlamaConfig / BertConfig from a config.json dict; `runtime`: dtype, param_dtype, remat, scan_unroll."""
    model_type = hf_config.get('model_type')
    family = SUPPORTED.get(model_type)
    if family is None:
        hint = (" (the multimodal Gemma 3; its text-only checkpoints, e.g. gemma-3-270m / -1b, are "
                "'gemma3_text')" if model_type == 'gemma3' else '')
        raise ModelError(f"{source}: model_type {model_type!r}{hint} is not supported. Supported architectures: "
                         f"{', '.join(sorted(SUPPORTED))}.")
    if family == 'llama':
        if num_labels:
            raise ValueError("num_labels is for encoders (BERT/RoBERTa); decoders are tuned as language models.")
        return llama.LlamaConfig.from_hf(hf_config, **runtime)
    return bert.BertConfig.from_hf(hf_config, num_labels=num_labels, pooling=pooling, **runtime)


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
    path = packaged.resolve(path)  # 'packaged:smollm2' -> the installed file
    if str(path).endswith('.gguf'):
        if not os.path.exists(path):
            raise MissingFileError(f"model.path: the GGUF file {path!r} does not exist; pass "
                                   f"an existing .gguf file, a Hugging Face directory or a hub name (--config.model.path for "
                                   f"ftjax.train, --model for ftjax.generate).")
        hf_config, state_dict, tokenizer = gguf_io.read_gguf(path)
        hf_config = hf_config.to_dict() if hasattr(hf_config, 'to_dict') else dict(hf_config)
        source = path
    else:
        path = resolve(path, revision)
        hf_config = read_config(path)
        state_dict = read_safetensors(path)
        tokenizer = read_tokenizer(path)
        source = path
    cfg = config_from_hf(hf_config, source, num_labels=num_labels, pooling=pooling, **runtime)
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
    """A local directory as is; otherwise a hub repo id, downloaded (or found in the HF cache)."""
    if os.path.isdir(path):
        return path
    looks_local = path.startswith(('.', '/', '~')) or path.count('/') != 1 or os.path.exists(os.path.dirname(path))
    if looks_local:
        raise MissingFileError(f"model.path: {path!r} does not exist. Pass a Hugging Face directory "
                               f"(config.json + *.safetensors), a .gguf file, or a hub name like 'org/model'.")
    import huggingface_hub
    try:
        return huggingface_hub.snapshot_download(path, revision=revision, allow_patterns=WEIGHT_PATTERNS)
    except Exception as e:  # offline, unknown repo, no access
        raise ModelError(f"model.path: could not fetch {path!r} from the Hugging Face hub ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}). Without a network, pass a local directory "
                         f"or a .gguf file.") from e


def read_config(path):
    f = os.path.join(path, 'config.json')
    if not os.path.exists(f):
        raise FileNotFoundError(f"{path}: no config.json; a Hugging Face model directory needs one.")
    with open(f) as fh:
        return json.load(fh)


def read_safetensors(path):
    """All tensors of a directory as numpy arrays: model.safetensors or a sharded index."""
    from safetensors.numpy import load_file
    index = os.path.join(path, 'model.safetensors.index.json')
    if os.path.exists(index):
        with open(index) as fh:
            files = sorted(set(json.load(fh)['weight_map'].values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith('.safetensors'))
    if not files:
        extra = ' (found PyTorch .bin weights: re-save them with save_pretrained(..., safe_serialization=True))' \
            if any(f.endswith('.bin') for f in os.listdir(path)) else ''
        raise FileNotFoundError(f"{path}: no *.safetensors weights{extra}.")
    state = {}
    for name in files:
        f = os.path.join(path, name)
        if not os.path.exists(f):
            raise FileNotFoundError(f"{path}: the index names shard {name!r}, which is missing.")
        try:
            state.update(load_file(f))
        except Exception as e:
            raise ValueError(f"{f}: cannot read safetensors file ({e}); it is truncated or corrupt. "
                             f"Download or save it again.") from e
    return state


def read_tokenizer(path):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        logging.warning('%s: no usable tokenizer (%s); continuing without one.', path, e)
        return None
