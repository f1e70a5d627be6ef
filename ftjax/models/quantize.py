"""Quantized frozen weights (QLoRA): the base stays int8 / 4-bit, adapters and everything trainable do not.

`config.model.quantize`:
  none  float weights (`model.frozen_dtype`)
  int8  per-output-channel absmax: w[k, n] = scale[n] * q[k, n], q int8 in [-127, 127]
  nf4   4-bit NormalFloat (Dettmers et al. 2023, as bitsandbytes' quantize_4bit(quant_type='nf4', blocksize=64)):
        blocks of 64 weights along the input axis, w = absmax * NF4[code], two codes per byte (high nibble
        first). model.quantize_double: the block absmaxes themselves as 8-bit codes of bitsandbytes' dynamic
        map (minus their mean), one float scale per output channel (QLoRA's double quantization)
  gguf  the GGUF file's own blocks, byte for byte (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K): `gguf_params`

Only frozen kernels (`layers.Dense`) and frozen embeddings (`layers.Embed`) are quantized, after the trainable
mask is known (`quantize_params`). A quantized leaf is a `QArray`: an ordinary pytree (flax.struct) of integer
codes and scales, so jit, donation, NamedSharding and orbax take it as they take arrays. It stands for the
matrix M [..., K, N] (K the contraction axis, blocked; N the output channels): a Dense kernel [in, out] is M, an
embedding [vocab, embed] is M transposed (`transpose`). Every part keeps its blocks on their own axis
([..., K / block, bytes, N], letters 'kbn'), so a sharding rule that splits K (fsdp) or N (tensor) splits between
blocks, never inside one, and a device dequantizes its shard alone.

Dequantization happens inside the layer, in the compute dtype, just before the matmul (`qmatmul`); its backward
pass dequantizes again instead of saving the float kernel, so no full-precision copy is stored.
"""
import dataclasses
import functools
import logging

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from ftjax.errors import ConfigError, ModelError

KINDS = ('none', 'int8', 'nf4', 'gguf')  # config.model.quantize
NF4_BLOCK = 64
# The 16 NF4 values (QLoRA, appendix; bitsandbytes `get_4bit_type('nf4')`), float32.
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)
# GGML type -> (weights per block, bytes per block), as ggml stores them.
GGUF_BLOCKS = {'Q4_0': (32, 18), 'Q4_1': (32, 20), 'Q5_0': (32, 22), 'Q5_1': (32, 24), 'Q8_0': (32, 34),
               'Q4_K': (256, 144), 'Q6_K': (256, 210)}
# Per kind, the trailing axes of each part: k = blocks along K (or K itself), b = inside a block, n = N.
LAYOUTS = {'int8': {'q': 'kn', 'scale': 'n'},
           'nf4': {'q': 'kbn', 'absmax': 'kn', 'absmax_q': 'kn', 'absmax_scale': 'n', 'absmax_offset': ''},
           **{kind: {'blocks': 'kbn'} for kind in GGUF_BLOCKS}}


def _dynamic_map():
    """bitsandbytes' `create_dynamic_map(signed=True)`: 256 sorted 8-bit codes (dynamic exponent, float32)."""
    data = []
    for i in range(7):
        bounds = np.linspace(0.1, 1, 2 ** i + 1, dtype=np.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist() + (-(10 ** (-6 + i)) * means).tolist()
    return np.sort(np.array(data + [0.0, 1.0], np.float32))


DYNAMIC = _dynamic_map()


@flax.struct.dataclass
class QArray:
    """A quantized matrix M [..., K, N] (leading axes: stacked layers); the parameter is M, or M^T if `transpose`."""
    parts: dict  # name -> array, trailing axes as LAYOUTS[kind][name]
    kind: str = flax.struct.field(pytree_node=False)  # 'int8', 'nf4', or a GGML type ('Q4_1', ...)
    k: int = flax.struct.field(pytree_node=False)  # length of the contraction axis K
    transpose: bool = flax.struct.field(pytree_node=False, default=False)  # embeddings [vocab, embed] = M^T

    def _any(self):
        name, letters = next((p, c) for p, c in LAYOUTS[self.kind].items() if p in self.parts and 'n' in c)
        return self.parts[name], letters

    @property
    def n(self):
        return self._any()[0].shape[-1]

    @property
    def shape(self):
        """The parameter's shape (what the float leaf would be)."""
        x, letters = self._any()
        lead = tuple(x.shape[:len(x.shape) - len(letters)])
        return lead + ((self.n, self.k) if self.transpose else (self.k, self.n))

    @property
    def T(self):
        """The transposed parameter (the tied LM head [embed, vocab] of an embedding [vocab, embed])."""
        return self.replace(transpose=not self.transpose)

    @property
    def nbytes(self):
        return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in self.parts.values())


def is_quantized(x):
    return isinstance(x, QArray)


def describe(model_cfg):
    """'none', 'int8', 'nf4', 'nf4+double' or 'gguf' from `config.model` (+'+linear' when the embedding stays
    unquantized): what the checkpoints' base hash covers."""
    kind = model_cfg.quantize
    if kind not in KINDS:
        raise ConfigError(f"config.model.quantize={kind!r} is not one of {list(KINDS)}.")
    linear = kind != 'none' and not model_cfg.quantize_embedding
    return kind + ('+double' if kind == 'nf4' and model_cfg.quantize_double else '') + ('+linear' if linear else '')


# --- dequantization (JAX, inside the jitted step) ---------------------------------------------------------

def _f16(b, i):
    """The float16 at byte offset i of every block: [..., nb, B, N] uint8 -> [..., nb, N] float32."""
    u = b[..., i, :].astype(jnp.uint16) | (b[..., i + 1, :].astype(jnp.uint16) << 8)
    return jax.lax.bitcast_convert_type(u, jnp.float16).astype(jnp.float32)


def _nibbles(qs):
    """[..., nb, 16, N] bytes -> [..., nb, 32, N]: low nibbles are weights 0..15, high ones 16..31 (ggml)."""
    return jnp.concatenate([qs & 15, qs >> 4], axis=-2)


def _high_bits(qh):
    """[..., nb, 4, N] bytes (a little-endian uint32 per block) -> bit j of it for weights j = 0..31, as << 4."""
    shifts = jnp.asarray(np.tile(np.arange(8, dtype=np.uint8), 4)[:, None])  # [32, 1]
    return ((jnp.repeat(qh, 8, axis=-2) >> shifts) & 1) << 4


def _split_nibbles(c, axis):
    """Low and high nibbles of `c` stacked at `axis` (K-quants: low nibbles first)."""
    return jnp.stack([c & 15, c >> 4], axis=axis)


def _ggml(kind, b):
    """ggml's block formats (gguf-py's `dequantize_blocks`) over blocks [..., nb, B, N] -> [..., nb, block, N]."""
    f32 = jnp.float32
    if kind == 'Q8_0':
        return jax.lax.bitcast_convert_type(b[..., 2:34, :], jnp.int8).astype(f32) * _f16(b, 0)[..., None, :]
    if kind == 'Q4_0':
        return _f16(b, 0)[..., None, :] * (_nibbles(b[..., 2:18, :]).astype(f32) - 8)
    if kind == 'Q4_1':
        return _f16(b, 0)[..., None, :] * _nibbles(b[..., 4:20, :]).astype(f32) + _f16(b, 2)[..., None, :]
    if kind == 'Q5_0':
        q = _nibbles(b[..., 6:22, :]) | _high_bits(b[..., 2:6, :])
        return _f16(b, 0)[..., None, :] * (q.astype(f32) - 16)
    if kind == 'Q5_1':
        q = _nibbles(b[..., 8:24, :]) | _high_bits(b[..., 4:8, :])
        return _f16(b, 0)[..., None, :] * q.astype(f32) + _f16(b, 2)[..., None, :]
    lead, nb, n = b.shape[:-3], b.shape[-3], b.shape[-1]
    if kind == 'Q4_K':  # d, dmin, 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32, 128 bytes of nibbles
        s = b[..., 4:16, :].reshape(*lead, nb, 3, 4, n)
        d, m, md = s[..., 0, :, :], s[..., 1, :, :], s[..., 2, :, :]  # [..., nb, 4, N]
        sc = jnp.concatenate([d & 63, (md & 15) | ((d >> 2) & 48)], axis=-2).astype(f32)  # [..., nb, 8, N]
        mn = jnp.concatenate([m & 63, (md >> 4) | ((m >> 2) & 48)], axis=-2).astype(f32)
        q = _split_nibbles(b[..., 16:144, :].reshape(*lead, nb, 4, 32, n), -3).reshape(*lead, nb, 8, 32, n)
        scale = (_f16(b, 0)[..., None, :] * sc)[..., None, :]  # [..., nb, 8, 1, N]
        shift = (_f16(b, 2)[..., None, :] * mn)[..., None, :]
        return (scale * q.astype(f32) - shift).reshape(*lead, nb, 256, n)
    if kind == 'Q6_K':  # 128 bytes low nibbles, 64 bytes 2-bit highs, 16 int8 scales, d
        ql = _split_nibbles(b[..., 0:128, :].reshape(*lead, nb, 2, 64, n), -3).reshape(*lead, nb, 8, 32, n)
        c = b[..., 128:192, :].reshape(*lead, nb, 2, 32, n)
        qh = jnp.stack([(c >> s) & 3 for s in (0, 2, 4, 6)], axis=-3).reshape(*lead, nb, 8, 32, n)
        q = ((ql | (qh << 4)).astype(jnp.int8) - 32).reshape(*lead, nb, 16, 16, n).astype(f32)
        sc = jax.lax.bitcast_convert_type(b[..., 192:208, :], jnp.int8).astype(f32)  # [..., nb, 16, N]
        return ((_f16(b, 208)[..., None, :] * sc)[..., None, :] * q).reshape(*lead, nb, 256, n)
    raise ModelError(f'GGML block type {kind} cannot be dequantized here (supported: {sorted(GGUF_BLOCKS)}).')


def _nf4_absmax(p):
    if 'absmax' in p:
        return p['absmax']  # [..., nb, N]
    codes = jnp.take(jnp.asarray(DYNAMIC), p['absmax_q'].astype(jnp.int32))  # double quantization
    return codes * p['absmax_scale'][..., None, :] + p['absmax_offset'][..., None, None]


def matrix(q: QArray):
    """M [..., K, N] in float32."""
    p = q.parts
    if q.kind == 'int8':
        return p['q'].astype(jnp.float32) * p['scale'][..., None, :]
    if q.kind == 'nf4':
        codes = jnp.stack([p['q'] >> 4, p['q'] & 15], axis=-2)  # [..., nb, 32, 2, N]: weight 2j, 2j + 1
        values = jnp.take(jnp.asarray(NF4), codes.astype(jnp.int32))
        w = values.reshape(*codes.shape[:-4], codes.shape[-4], NF4_BLOCK, codes.shape[-1])  # [..., nb, 64, N]
        w = w * _nf4_absmax(p)[..., None, :]
    else:
        w = _ggml(q.kind, p['blocks'])  # [..., nb, block, N]
    return w.reshape(*w.shape[:-3], q.k, w.shape[-1])


def dequantize(x, dtype=jnp.float32):
    """The parameter as a float array in `dtype` (a non-quantized leaf is only cast)."""
    if not is_quantized(x):
        return jnp.asarray(x).astype(dtype)
    m = matrix(x)
    return (jnp.swapaxes(m, -1, -2) if x.transpose else m).astype(dtype)


def take_rows(q: QArray, ids, dtype):
    """Rows `ids` of a quantized embedding [vocab, embed] -> [*ids.shape, embed]: only those rows are decoded."""
    flat = ids.reshape(-1)
    parts = {name: (jnp.take(v, flat, axis=-1) if 'n' in LAYOUTS[q.kind][name] else v) for name, v in q.parts.items()}
    rows = jnp.swapaxes(matrix(q.replace(parts=parts)), -1, -2)  # [tokens, K]
    return rows.reshape(*ids.shape, q.k).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def qmatmul(x, q, dtype):
    """x [..., K] @ M [K, N] with M dequantized in `dtype`; the backward pass dequantizes M again (nothing
    float is saved) and gives no gradient to the frozen codes."""
    return x.astype(dtype) @ matrix(q).astype(dtype)


def _qmatmul_fwd(x, q, dtype):
    return qmatmul(x, q, dtype), q


def _qmatmul_bwd(dtype, q, g):
    w = matrix(q).astype(dtype)  # [K, N]
    dx = jnp.einsum('...n,kn->...k', g.astype(dtype), w)
    return dx, jax.tree.map(_zero_cotangent, q)


def _zero_cotangent(x):
    return jnp.zeros(x.shape, jax.dtypes.float0) if not jnp.issubdtype(x.dtype, jnp.floating) else jnp.zeros_like(x)


qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


def frozen_param(module, name, init, shape, dtype):
    """`module.param(name, init, shape, dtype)`, or the quantized leaf stored under `name` as it is (flax's
    shape check would refuse it: its parts are not `shape`)."""
    if module.has_variable('params', name):
        value = module.get_variable('params', name)
        if is_quantized(value):
            return value
    return module.param(name, init, shape, dtype)


# --- quantization (numpy, on the host, once after loading) -----------------------------------------------

def _nearest(code, x):
    """Index of the nearest value of the sorted float32 `code` (ties to the lower one, like bitsandbytes)."""
    mid = (code[:-1] + code[1:]) / 2
    return np.searchsorted(mid, x, side='left').astype(np.uint8)


def _scaled(x, absmax):
    return np.clip(x * (np.float32(1) / np.maximum(absmax, np.float32(1e-38))), -1, 1)


def quantize_int8(m):
    """M [..., K, N] float -> parts {'q': int8 [..., K, N], 'scale': float32 [..., N]}."""
    m = np.asarray(m, np.float32)
    scale = np.abs(m).max(axis=-2) / np.float32(127)
    q = np.rint(m / np.where(scale == 0, np.float32(1), scale)[..., None, :])
    return {'q': np.clip(q, -127, 127).astype(np.int8), 'scale': scale.astype(np.float32)}


def quantize_nf4(m, double=False):
    """M [..., K, N] float (K a multiple of 64) -> parts {'q': uint8 [..., K/64, 32, N], 'absmax' [..., K/64, N]},
    or with `double` the absmax as 'absmax_q' uint8 codes, 'absmax_scale' [..., N] and 'absmax_offset' [...]."""
    m = np.asarray(m, np.float32)
    *lead, k, n = m.shape
    blocks = m.reshape(*lead, k // NF4_BLOCK, NF4_BLOCK, n)
    absmax = np.abs(blocks).max(axis=-2)  # [..., nb, N]
    codes = _nearest(NF4, _scaled(blocks, absmax[..., None, :]))  # [..., nb, 64, N]
    parts = {'q': (codes[..., 0::2, :] << 4) | codes[..., 1::2, :]}
    if not double:
        return dict(parts, absmax=absmax)
    offset = absmax.mean(axis=(-2, -1), dtype=np.float32)  # [...]
    centred = absmax - offset[..., None, None]
    scale = np.abs(centred).max(axis=-2)  # [..., N]
    return dict(parts, absmax_q=_nearest(DYNAMIC, _scaled(centred, scale[..., None, :])),
                absmax_scale=scale.astype(np.float32), absmax_offset=offset.astype(np.float32))


def _candidate(path, leaf, mask_leaf, embeddings=True):
    """(K, transpose) when the leaf may be quantized: a frozen Dense kernel or (`embeddings`) Embed table; else
    None."""
    frozen = isinstance(mask_leaf, (bool, np.bool_)) and not mask_leaf  # LastLayers(n): partly trained
    if not frozen or is_quantized(leaf) or len(getattr(leaf, 'shape', ())) < 2:
        return None
    if path[-1] == 'kernel':
        return leaf.shape[-2], False
    if path[-1] == 'embedding' and embeddings:
        return leaf.shape[-1], True
    return None


def _abstract(kind, lead, k, n, double):
    s = lambda *shape, dtype=np.float32: jax.ShapeDtypeStruct(tuple(lead) + shape, np.dtype(dtype))
    if kind == 'int8':
        return {'q': s(k, n, dtype=np.int8), 'scale': s(n)}
    nb = k // NF4_BLOCK
    parts = {'q': s(nb, NF4_BLOCK // 2, n, dtype=np.uint8)}
    if not double:
        return dict(parts, absmax=s(nb, n))
    return dict(parts, absmax_q=s(nb, n, dtype=np.uint8), absmax_scale=s(n), absmax_offset=s())


def quantize_params(params, mask, kind, double=False, gguf=None, embeddings=True):
    """`params` with every frozen kernel / embedding (mask leaf False) as a QArray of `kind`; trainable leaves,
    vectors and matrices whose K does not fit the block stay as they are. Shape structs (`jax.eval_shape`,
    `ftjax.compile_check`) give shape-struct QArrays. 'gguf' takes the file's blocks: `gguf` is a `GGUFBlocks`.
    `embeddings=False`: the token embedding (and so a tied LM head) stays as it is, as bitsandbytes' QLoRA
    quantizes linear layers only."""
    if kind not in KINDS:
        raise ConfigError(f"config.model.quantize={kind!r} is not one of {list(KINDS)}.")
    if kind == 'none':
        return params
    flat, flat_mask = traverse_util.flatten_dict(params), traverse_util.flatten_dict(mask)
    if kind == 'gguf':
        return traverse_util.unflatten_dict(gguf_params(flat, flat_mask, gguf, embeddings))
    kept = []
    for path, leaf in flat.items():
        found = _candidate(path, leaf, flat_mask.get(path), embeddings)
        if found is None:
            continue
        k, transpose = found
        if kind == 'nf4' and k % NF4_BLOCK:
            kept.append(f"{'/'.join(path)} (K={k})")
            continue
        lead, n = leaf.shape[:-2], leaf.shape[-1] if not transpose else leaf.shape[-2]
        if isinstance(leaf, jax.ShapeDtypeStruct):
            parts = _abstract(kind, lead, k, n, double)
        else:
            m = np.asarray(leaf, np.float32)
            m = np.swapaxes(m, -1, -2) if transpose else m
            parts = quantize_int8(m) if kind == 'int8' else quantize_nf4(m, double)
        flat[path] = QArray(parts, kind, int(k), transpose)
    if kept:
        logging.warning('model.quantize=nf4: %d frozen matrices stay unquantized (K not a multiple of %d): %s',
                        len(kept), NF4_BLOCK, ', '.join(kept[:5]))
    return traverse_util.unflatten_dict(flat)


# --- GGUF: the file's own blocks ---------------------------------------------------------------------------

@dataclasses.dataclass
class GGUFBlocks:
    """What `gguf_params` needs of a GGUF file (`ftjax.build.quantize_frozen` reads it)."""
    path: str
    blocks: dict  # {HF name: (GGML type, uint8 [N, bytes per row])}: `gguf_io.read_gguf_blocks`
    rows: list  # [(ftjax path, HF name with '{i}', kind)]: `convert.table`
    num_layers: int


def gguf_params(flat, flat_mask, gguf: GGUFBlocks, embeddings=True):
    """The flat params with each frozen kernel / embedding replaced by the GGUF file's blocks for it, checked
    against the float values already loaded from the same file (layer 0). A stacked leaf whose layers mix
    Q4_0 / Q5_0 / Q8_0 is kept as Q8_0 (exact); one that mixes other types (Q4_K and Q6_K), or that the file
    stores as floats, stays float (logged)."""
    raw, path = gguf.blocks, gguf.path
    kept = []
    for ours, name, _ in gguf.rows:
        leaf = flat.get(ours)
        found = None if leaf is None else _candidate(ours, leaf, flat_mask.get(ours), embeddings)
        if found is None:
            continue
        if '{e}' in name:  # one stacked leaf [layers, experts, in, out] of many GGUF experts: read dequantized
            kept.append(f"{'/'.join(ours)} (experts, read dequantized)")
            continue
        names = [name.format(i=i) for i in range(gguf.num_layers)] if '{i}' in name else [name]
        types = {raw[n_][0] if n_ in raw else 'F32' for n_ in names}
        rows = [raw[n_][1] for n_ in names if n_ in raw]
        if len(types) > 1 and types <= set(WIDEN):  # layers differ (llama.cpp's mixes): one exact block type
            rows, types = [_widen_to_q8_0(raw[n_][0], raw[n_][1]) for n_ in names], {'Q8_0'}
        if len(types) != 1 or next(iter(types)) not in GGUF_BLOCKS:
            kept.append(f"{'/'.join(ours)} ({'/'.join(sorted(types))})")
            continue
        kind = types.pop()
        k, transpose = found
        block, nbytes = GGUF_BLOCKS[kind]
        stacked = np.stack([r.reshape(-1, k // block, nbytes).transpose(1, 2, 0) for r in rows])
        q = QArray({'blocks': stacked if '{i}' in name else stacked[0]}, kind, int(k), transpose)
        first = q.replace(parts={'blocks': stacked[0]})
        want = np.asarray(leaf[0] if '{i}' in name else leaf, np.float32)
        got = np.asarray(dequantize(first))
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max()):
            raise ModelError(f"{path}: the {kind} blocks of {names[0]!r} do not decode to the weights read from the "
                             f"same file ({'/'.join(ours)}); the file's layout is not understood here. Use "
                             f"config.model.quantize='nf4' instead.")
        flat[ours] = q
    if kept:
        logging.warning("model.quantize='gguf': %d frozen matrices stay float (mixed or float GGUF types): %s",
                        len(kept), ', '.join(kept[:6]))
    return flat


WIDEN = ('Q4_0', 'Q5_0', 'Q8_0')  # d * (integer in [-16, 15]): exactly a Q8_0 block with the same d


def _widen_to_q8_0(kind, rows):
    """Q4_0 / Q5_0 rows [N, bytes] as Q8_0 blocks of the same weights, exactly (Q8_0 rows as they are): for a
    stacked leaf whose layers llama.cpp stored in different types (Gemma 3 Q4_K_M's attn_v: Q5_0 and Q8_0)."""
    if kind == 'Q8_0':
        return rows
    b = rows.reshape(rows.shape[0], -1, GGUF_BLOCKS[kind][1])  # [N, nb, bytes]
    if kind == 'Q4_0':
        qs, high, bias = b[..., 2:18], 0, 8
    else:  # Q5_0: bit j of the little-endian uint32 qh is bit 4 of weight j
        qh = np.ascontiguousarray(b[..., 2:6]).view('<u4')  # [N, nb, 1]
        high = (((qh >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)  # [N, nb, 32]
        qs, bias = b[..., 6:22], 16
    q = (np.concatenate([qs & 15, qs >> 4], axis=-1) | high).astype(np.int16) - bias  # [N, nb, 32]
    return np.concatenate([b[..., :2], q.astype(np.int8).view(np.uint8)], axis=-1).reshape(rows.shape[0], -1)


# --- trees: sharding specs, sizes, export ------------------------------------------------------------------

def _part_spec(spec, q, letters):
    names = tuple(spec) + (None,) * (len(q.shape) - len(tuple(spec)))
    lead, (a, b) = names[:-2], names[-2:]
    axis = {'k': b if q.transpose else a, 'n': a if q.transpose else b, 'b': None}
    return P(*lead, *(axis[c] for c in letters))


def partition_specs(specs, params):
    """The logical PartitionSpec tree of the model (`ftjax.sharding.logical_specs`) with each quantized leaf of
    `params` given a QArray of specs, one per part: K and N keep the kernel's logical axes, a block's inside none."""
    flat_specs = traverse_util.flatten_dict(specs)
    for path, leaf in traverse_util.flatten_dict(params).items():
        if is_quantized(leaf) and path in flat_specs:
            flat_specs[path] = leaf.replace(parts={name: _part_spec(flat_specs[path], leaf, LAYOUTS[leaf.kind][name])
                                                   for name in leaf.parts})
    return traverse_util.unflatten_dict(flat_specs)


def _leaves(tree):
    return jax.tree.leaves(tree, is_leaf=is_quantized)


def num_weights(tree):
    """Weights a tree stands for (a quantized matrix counts its K x N, not its codes)."""
    return int(sum(np.prod(x.shape) for x in _leaves(tree) if hasattr(x, 'shape')))


def nbytes(tree):
    """Bytes a tree's arrays occupy (quantized leaves: their codes and scales)."""
    return int(sum(x.nbytes if is_quantized(x) else np.prod(x.shape) * np.dtype(x.dtype).itemsize
                   for x in _leaves(tree) if hasattr(x, 'shape')))


def dequantize_tree(params, dtype=np.float32):
    """Every quantized leaf as a float numpy array (export, a merged model); other leaves as they are."""
    return jax.tree.map(lambda x: np.asarray(dequantize(x, dtype)) if is_quantized(x) else x, params,
                        is_leaf=is_quantized)


def kinds_in(params):
    """The quantization kinds present in a tree, e.g. ['Q4_1', 'Q8_0'] or ['nf4']."""
    return sorted({x.kind for x in _leaves(params) if is_quantized(x)})
