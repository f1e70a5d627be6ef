"""Reading llama.cpp GGUF files: (Hugging Face config, HF-named state dict, tokenizer).

A GGUF file holds metadata (hyper-parameters, the tokenizer) and tensors under llama.cpp names,
possibly quantized. `read_gguf` turns it into exactly what a transformers `LlamaForCausalLM`
checkpoint would hold, so the rest of ftjax loads it like any HF directory:

    hf_config, state_dict, tokenizer = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")

Three things differ from a HF checkpoint and are undone here:
  * ggml lists dimensions fastest-first, so a GGUF shape [in, out] is the numpy array [out, in];
  * quantized tensors are stored as blocks of bytes and are dequantized with `gguf.quants`;
  * llama.cpp's converter permutes the rows of q_proj / k_proj (its RoPE pairs neighbouring
    dimensions, HF's pairs the two halves of each head); `_unpermute` is the inverse.

Weights are read with numpy only (never torch).
"""
import logging
import os
import re

import numpy as np

from ftjax.errors import MissingFileError, ModelError

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ('llama',)

# llama.cpp tensor name -> Hugging Face name ({i} is the layer index).
_GLOBAL_NAMES = {
    'token_embd.weight': 'model.embed_tokens.weight',    # [vocab, hidden]
    'output_norm.weight': 'model.norm.weight',           # [hidden]
    'output.weight': 'lm_head.weight',                   # [vocab, hidden], only when untied
}
_LAYER_NAMES = {
    'attn_q': 'self_attn.q_proj',            # [heads * head_dim, hidden]
    'attn_k': 'self_attn.k_proj',            # [kv_heads * head_dim, hidden]
    'attn_v': 'self_attn.v_proj',            # [kv_heads * head_dim, hidden]
    'attn_output': 'self_attn.o_proj',       # [hidden, heads * head_dim]
    'ffn_gate': 'mlp.gate_proj',             # [intermediate, hidden]
    'ffn_up': 'mlp.up_proj',                 # [intermediate, hidden]
    'ffn_down': 'mlp.down_proj',             # [hidden, intermediate]
    'attn_norm': 'input_layernorm',          # [hidden]
    'ffn_norm': 'post_attention_layernorm',  # [hidden]
}
_LAYER_RE = re.compile(r'^blk\.(\d+)\.(\w+)\.weight$')
# Tensors llama.cpp adds that have no HF counterpart (Llama-3 RoPE frequency factors).
_IGNORED = ('rope_freqs.weight',)

# GGUF metadata key (under "tokenizer.") -> name used by transformers' GGUF tokenizer builders.
_TOKENIZER_KEYS = {
    'ggml.model': 'tokenizer_type', 'ggml.pre': 'pre_tokenizer_type', 'ggml.tokens': 'tokens',
    'ggml.scores': 'scores', 'ggml.token_type': 'token_type', 'ggml.merges': 'merges',
    'ggml.precompiled_charsmap': 'precompiled_charsmap', 'ggml.bos_token_id': 'bos_token_id',
    'ggml.eos_token_id': 'eos_token_id', 'ggml.unknown_token_id': 'unk_token_id',
    'ggml.padding_token_id': 'pad_token_id', 'ggml.add_space_prefix': 'add_prefix_space',
}
_TOKENIZER_CONFIG_KEYS = {'chat_template': 'chat_template', 'ggml.add_bos_token': 'add_bos_token',
                          'ggml.add_eos_token': 'add_eos_token'}
_SPECIAL_TOKENS = {'bos_token': 'bos_token_id', 'eos_token': 'eos_token_id',
                   'unk_token': 'unknown_token_id', 'pad_token': 'padding_token_id'}


def read_gguf(path: str):
    """Reads a llama-architecture GGUF file into (hf_config, state_dict, tokenizer).

    hf_config: a `transformers.LlamaConfig`; state_dict: float32 numpy arrays under transformers'
    `LlamaForCausalLM` names and PyTorch layout ([out, in]); tokenizer: a
    `PreTrainedTokenizerFast` with the file's vocabulary, special tokens and chat template.
    """
    reader = _open(path)
    metadata = {name: field.contents() for name, field in reader.fields.items()}
    arch = metadata.get('general.architecture')
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(f"{path}: GGUF architecture {arch!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)}).")
    tensor_names = {t.name for t in reader.tensors}
    hf_config = _config(metadata, tensor_names, path)
    state_dict = _state_dict(reader, hf_config, path)
    tokenizer = _tokenizer(metadata, path)
    return hf_config, state_dict, tokenizer


def read_gguf_config(path) -> dict:
    """The Hugging Face config (as a dict) of a GGUF file, from its header and metadata alone (no tensor data)."""
    reader = _open(path)  # memory-mapped: only the header and metadata are read
    metadata = {name: field.contents() for name, field in reader.fields.items()}
    return _config(metadata, {t.name for t in reader.tensors}, path).to_dict()


def _open(path):
    """A `gguf.GGUFReader` (memory-mapped), with clear errors for missing or broken files."""
    import gguf

    if not os.path.isfile(path):
        raise MissingFileError(f"GGUF file {path!r} does not exist.")
    try:
        return gguf.GGUFReader(path)
    except OSError:
        raise
    except Exception as e:  # bad magic, truncated header or tensor data, empty file, ...
        raise ModelError(f"{path}: not a valid GGUF file ({type(e).__name__}: {e}).") from e


# ----------------------------------------------------------------------------------------- config

def _config(metadata, tensor_names, path):
    """A `LlamaConfig` from the `llama.*` and `tokenizer.ggml.*` metadata."""
    import transformers

    def need(key):
        if key not in metadata:
            raise ModelError(f"{path}: GGUF metadata key {key!r} is missing.")
        return metadata[key]

    hidden, heads = int(need('llama.embedding_length')), int(need('llama.attention.head_count'))
    tokens = metadata.get('tokenizer.ggml.tokens')
    vocab_size = metadata.get('llama.vocab_size', len(tokens) if tokens is not None else None)
    if vocab_size is None:
        raise ModelError(f"{path}: GGUF metadata has neither 'llama.vocab_size' nor 'tokenizer.ggml.tokens'.")
    cfg = dict(
        vocab_size=int(vocab_size), hidden_size=hidden,
        intermediate_size=int(need('llama.feed_forward_length')),
        num_hidden_layers=int(need('llama.block_count')),
        num_attention_heads=heads,
        num_key_value_heads=int(metadata.get('llama.attention.head_count_kv', heads)),
        max_position_embeddings=int(need('llama.context_length')),
        rms_norm_eps=_f32(need('llama.attention.layer_norm_rms_epsilon')),
        rope_theta=_f32(metadata.get('llama.rope.freq_base', 10000.0)),
        tie_word_embeddings='output.weight' not in tensor_names,
        bos_token_id=metadata.get('tokenizer.ggml.bos_token_id'),
        eos_token_id=metadata.get('tokenizer.ggml.eos_token_id'),
        pad_token_id=metadata.get('tokenizer.ggml.padding_token_id'))
    head_dim = metadata.get('llama.attention.key_length')
    if head_dim is not None and int(head_dim) != hidden // heads:
        cfg['head_dim'] = int(head_dim)
    scaling = _rope_scaling(metadata, path)
    if scaling:
        cfg['rope_scaling'] = scaling
    return transformers.LlamaConfig(**cfg)


def _f32(x):
    """GGUF stores floats as float32: 1e-5 reads 9.99999975e-06; give back the short decimal."""
    return float(str(np.float32(x)))


def _rope_scaling(metadata, path):
    kind = metadata.get('llama.rope.scaling.type', 'none')
    if kind == 'none':
        return None
    if kind == 'linear':
        return {'rope_type': 'linear', 'factor': _f32(metadata['llama.rope.scaling.factor'])}
    raise ModelError(f"{path}: RoPE scaling {kind!r} is not supported (supported: none, linear).")


# ----------------------------------------------------------------------------------------- tensors

def _state_dict(reader, hf_config, path):
    """{HF name: float32 array} for every tensor of the file."""
    heads, kv_heads = hf_config.num_attention_heads, hf_config.num_key_value_heads
    state_dict = {}
    for tensor in reader.tensors:
        if tensor.name in _IGNORED:
            logger.warning('%s: ignoring %s (no Hugging Face counterpart).', path, tensor.name)
            continue
        name = _hf_name(tensor.name, path)
        w = _dequantize(tensor, path)
        if name.endswith('q_proj.weight'):
            w = _unpermute(w, heads)
        elif name.endswith('k_proj.weight'):
            w = _unpermute(w, kv_heads)
        state_dict[name] = w
    _check_complete(state_dict, hf_config, path)
    return state_dict


def quantization(path):
    """The quantized tensor types of a GGUF file, most bytes first (e.g. ['Q4_1', 'Q8_0']); [] when every
    tensor is a float type. Reads the header only (the tensor data is memory-mapped, not read)."""
    sizes = {}
    for tensor in _open(path).tensors:
        kind = tensor.tensor_type.name
        if kind not in ('F32', 'F16', 'BF16', 'F64'):
            sizes[kind] = sizes.get(kind, 0) + int(tensor.n_bytes)
    return sorted(sizes, key=sizes.get, reverse=True)


def _hf_name(gguf_name, path):
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f'model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight'
    raise ModelError(f"{path}: unexpected tensor {gguf_name!r} for a llama GGUF file.")


def _dequantize(tensor, path):
    """The tensor as a float32 numpy array in numpy / PyTorch dimension order."""
    import gguf

    shape = tuple(int(d) for d in reversed(tensor.shape))  # ggml [in, out] -> numpy [out, in]
    try:
        w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise ModelError(f"{path}: tensor {tensor.name!r} has quantization type "
                         f"{tensor.tensor_type.name}, which cannot be dequantized ({e}).") from e
    return np.array(w.reshape(shape), dtype=np.float32)  # a copy: `w` may view the read-only mmap


def _unpermute(w, n_head):
    """Inverse of llama.cpp's `permute`, which is

        w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)

    i.e. within each head, row (2 * j + half) of the GGUF is row (half * head_dim / 2 + j) of HF.
    """
    rows = w.shape[0]  # [n_head * head_dim, in]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_complete(state_dict, hf_config, path):
    expected = ['model.embed_tokens.weight', 'model.norm.weight']
    expected += [f'model.layers.{i}.{name}.weight'
                 for i in range(hf_config.num_hidden_layers) for name in _LAYER_NAMES.values()]
    missing = [name for name in expected if name not in state_dict]
    if missing:
        raise ModelError(f"{path}: GGUF file lacks tensors for {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}.")


# ----------------------------------------------------------------------------------------- tokenizer

def _tokenizer(metadata, path):
    """A `PreTrainedTokenizerFast` built the way `AutoTokenizer.from_pretrained(d, gguf_file=f)` does
    (same transformers builders), but from metadata already read, so torch is never imported."""
    import transformers
    try:  # transformers >= 5
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except ImportError:  # transformers 4.x
        from transformers.integrations.ggml import convert_gguf_tokenizer

    def section(keys):
        return {name: metadata[f'tokenizer.{key}'] for key, name in keys.items()
                if f'tokenizer.{key}' in metadata}

    tokenizer_dict, tokenizer_config = section(_TOKENIZER_KEYS), section(_TOKENIZER_CONFIG_KEYS)
    if 'tokens' not in tokenizer_dict:
        raise ModelError(f"{path}: GGUF metadata key 'tokenizer.ggml.tokens' is missing (no vocabulary).")
    if tokenizer_dict.get('tokenizer_type') == 'llama':  # llama.cpp adds BOS to sentencepiece by default
        tokenizer_config.setdefault('add_bos_token', True)
    tokens = tokenizer_dict['tokens']
    for name, key in _SPECIAL_TOKENS.items():
        token_id = metadata.get(f'tokenizer.ggml.{key}')
        tokenizer_config[name] = tokens[token_id] if token_id is not None else None
    try:
        backend, extra = convert_gguf_tokenizer(metadata['general.architecture'], tokenizer_dict)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise ModelError(f"{path}: cannot build the tokenizer from the GGUF metadata ({e}).") from e
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)
