"""Sharded training equals 1-device training; params land where the rules say; checkpoints move meshes.

All on the 8 fake CPU devices of conftest, through the functions the trainer itself uses
(`build.build_model_and_mask`, `build.sharded_state`, `build.jit_train_step`, `data.to_global`).
"""
import itertools

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from ftjax import build, checkpoint, data as data_lib, optim, sharding
from ftjax.config import DEFAULT_RULES, override
from ftjax.infer import Sampler
from ftjax.loop import train_and_evaluate
from ftjax.models import abstract_variables
from ftjax.state import partition
from tests.tiny import losses, tiny_config

MESHES = {'data8': (8, 1, 1), 'fsdp8': (1, 8, 1), 'data2_fsdp2_tensor2': (2, 2, 2),
          'fsdp2_context4': (1, 2, 1, 4)}  # (data, fsdp, tensor[, context])
RTOL = 1e-5
STEPS = 3


def mesh_of(shape):
    return sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)), jax.devices()[:int(np.prod(shape))])


def equivalence_config(model_dir, data, method):
    # SGD (+ momentum, clipping): the update is linear in the gradient, so the comparison measures the
    # sharded computation itself. AdamW divides by |g| elementwise, which turns float32 reduction-order
    # differences (~1e-7) in near-zero gradient entries into ~2e-5 relative param differences on *every*
    # tensor-sharded mesh (measured: LoRA, 3 steps, lr 1e-2; with SGD the same meshes agree to <1e-6).
    return tiny_config(model_dir, data, **{'peft.method': method, 'train.batch_size': 8, 'optim.name': 'sgd',
                                           'optim.learning_rate': 1.0})


def train_steps(config, shape, steps=STEPS):
    """(losses, grad norms, initial trainable, trained trainable, final state) of `steps` steps on a mesh."""
    pre, mask = build.build_model_and_mask(config)
    mesh = mesh_of(shape)
    rules = sharding.rules_from_config(config.mesh.rules)
    tx, schedule = optim.make_optimizer(config, partition(pre.params, mask)[0], config.train.steps)
    state, state_sh = build.sharded_state(pre, mask, tx, config, mesh, rules)
    initial = jax.device_get(state.trainable)
    batch_sh = sharding.batch_sharding(mesh)
    p_step = build.jit_train_step(pre.model, config, tx, schedule, state_sh, batch_sh)
    it = data_lib.make_iterator(data_lib.build_dataset(config.data, pre.tokenizer, 'train'),
                                config.train.batch_size, config.train.seed)
    key = jax.random.key(config.train.seed)
    loss, gnorm = [], []
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for step in range(steps):
            state, metrics = p_step(state, data_lib.to_global(next(it), batch_sh), jax.random.fold_in(key, step))
            loss.append(float(metrics['loss']))
            gnorm.append(float(metrics['grad_norm']))
    return np.array(loss), np.array(gnorm), initial, jax.device_get(state.trainable), state


@pytest.fixture(scope='module')
def one_device(tiny_llama_dir, chat_data):
    """method -> train_steps on one device, computed on first use (the fast lane needs only 'full')."""
    done = {}

    def get(method):
        if method not in done:
            done[method] = train_steps(equivalence_config(tiny_llama_dir, chat_data, method), (1, 1, 1))
        return done[method]
    return get


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(np.asarray(b, np.float64)), 1e-30))


FAST_CASE = ('data2_fsdp2_tensor2', 'full')  # the fast lane: full fine-tuning on all three axes at once


@pytest.mark.parametrize('mesh_name,method', [case if case == FAST_CASE else pytest.param(*case, marks=pytest.mark.slow)
                                              for case in itertools.product(MESHES, ('full', 'lora'))])
def test_sharded_steps_equal_one_device(tiny_llama_dir, chat_data, one_device, method, mesh_name):
    ref_loss, ref_gnorm, ref_init, ref_params, _ = one_device(method)
    loss, gnorm, init, params, state = train_steps(equivalence_config(tiny_llama_dir, chat_data, method),
                                                   MESHES[mesh_name])
    sharded = any(not x.sharding.is_fully_replicated for x in jax.tree.leaves((state.trainable, state.frozen)))
    assert sharded == (MESHES[mesh_name][0] < 8)  # data=8 replicates the params, fsdp / tensor / context split them
    assert ref_loss[-1] < ref_loss[0]  # it trains
    worst = {'loss': float(np.max(np.abs(loss - ref_loss) / np.abs(ref_loss))),
             'grad_norm': float(np.max(np.abs(gnorm - ref_gnorm) / np.abs(ref_gnorm)))}
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    leaf_updates = {}
    for (path, p), p0, r, r0 in zip(flat, jax.tree.leaves(init), jax.tree.leaves(ref_params),
                                    jax.tree.leaves(ref_init)):
        name = jax.tree_util.keystr(path)
        assert np.array_equal(p0, r0), f'{name}: different initial values'
        worst[f'params {name}'] = rel(p, r)  # per leaf
        leaf_updates[name] = rel(p - p0, r - r0)  # the change the steps made (reported, see below)
    # The update of all trainable leaves together (the base weights subtracted, so this sees the steps only).
    # Per leaf, updates are not held to 1e-5: a leaf whose gradient sums cancel (lora_a, whose gradient is
    # exactly 0 at step 1) gets ~1e-5 from the summation order alone, even on data=8 (measured 1.5e-5).
    delta = lambda a, b: np.concatenate([(x - y).ravel() for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))])
    worst['update (all leaves)'] = rel(delta(params, init), delta(ref_params, ref_init))
    print(f'{method} {mesh_name}: max relative differences: loss {worst["loss"]:.2e}, grad_norm '
          f'{worst["grad_norm"]:.2e}, params (per leaf) {max(v for k, v in worst.items() if "params" in k):.2e}, '
          f'update (all leaves) {worst["update (all leaves)"]:.2e}, update (worst leaf) '
          f'{max(leaf_updates.values()):.2e} {max(leaf_updates, key=leaf_updates.get)}')
    bad = {k: v for k, v in worst.items() if not v <= RTOL}
    assert not bad, f'{method} on {mesh_name} differs from 1 device: {bad}'


# --------------------------------------------------------------------------------------- placement

def expected_spec(logical, shape, mesh):
    """The mesh PartitionSpec DEFAULT_RULES give a param with these logical axes (written out here,
    independently of flax): first rule of each name; a dim its mesh axes don't divide stays whole."""
    table = {}
    for name, axes in DEFAULT_RULES:
        table.setdefault(name, axes)
    out = []
    for name, dim in zip(logical, shape):
        axes = table.get(name) if name is not None else None
        names = axes if isinstance(axes, tuple) else ((axes,) if axes else ())
        out.append(axes if names and dim % int(np.prod([mesh.shape[a] for a in names])) == 0 else None)
    return strip(P(*out))


def strip(spec):
    """P(None, 'fsdp', None) -> (None, 'fsdp'): trailing unsharded dims dropped for comparison."""
    parts = list(spec)
    while parts and parts[-1] is None:
        parts.pop()
    return tuple(parts)


@pytest.mark.parametrize('method', ['full', 'lora'])
@pytest.mark.parametrize('mesh_name', ['fsdp8', 'data2_fsdp2_tensor2'])
def test_params_placed_as_the_rules_say(tiny_llama_dir, chat_data, method, mesh_name):
    config = tiny_config(tiny_llama_dir, chat_data, **{'peft.method': method})
    pre, mask = build.build_model_and_mask(config)
    mesh = mesh_of(MESHES[mesh_name])
    rules = sharding.rules_from_config(config.mesh.rules)
    tx, _ = optim.make_optimizer(config, partition(pre.params, mask)[0], config.train.steps)
    state, _ = build.sharded_state(pre, mask, tx, config, mesh, rules)
    placed = {}
    for part in (state.frozen, state.trainable):
        for path, x in jax.tree_util.tree_flatten_with_path(part)[0]:
            placed['/'.join(str(k.key) for k in path)] = x
    logical = jax.tree_util.tree_flatten_with_path(sharding.logical_specs(abstract_variables(pre.model)),
                                                   is_leaf=lambda x: isinstance(x, P))[0]
    assert len(logical) == len(placed) > 10
    for path, spec in logical:  # every param, from its logical names
        key = '/'.join(str(k.key) for k in path)
        x = placed[key]
        assert strip(x.sharding.spec) == expected_spec(spec, x.shape, mesh), (key, spec, x.sharding.spec)
    moments = 0
    for path, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:  # AdamW's mu / nu
        key = '/'.join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
        if key in placed:
            moments += 1
            assert x.sharding.spec == placed[key].sharding.spec, (jax.tree_util.keystr(path), x.sharding.spec)
    assert moments == 2 * len(jax.tree.leaves(state.trainable))
    if mesh_name != 'data2_fsdp2_tensor2':
        return
    F = ('fsdp', 'context')  # 'embed' -> fsdp, then context (a context axis shards the weights too)
    written_out = {  # a few, explicitly: (vocab, embed) -> (tensor, F); 'layers' and norms unsharded
        'embed/embedding': ('tensor', F),
        'layers/q_proj/kernel': (None, F, 'tensor'),
        'layers/k_proj/kernel': (None, F, 'tensor'),
        'layers/o_proj/kernel': (None, 'tensor', F),
        'layers/gate_proj/kernel': (None, F, 'tensor'),
        'layers/down_proj/kernel': (None, 'tensor', F),
        'layers/attn_norm/scale': (),
        'final_norm/scale': (),
    }
    if method == 'lora':  # adapters follow their kernel: lora_a [in, r] the input axis, lora_b [r, out] the output
        written_out.update({
            'layers/q_proj/lora_a': (None, F), 'layers/q_proj/lora_b': (None, None, 'tensor'),
            'layers/down_proj/lora_a': (None, 'tensor'), 'layers/down_proj/lora_b': (None, None, F),
        })
    for key, spec in written_out.items():
        assert strip(placed[key].sharding.spec) == spec, (key, placed[key].sharding.spec)


# --------------------------------------------------------------------------------------- checkpoints

def restored_on(config, workdir, step, shape):
    """The run's checkpoint `step` restored onto a mesh of `shape`: (train state, its shardings)."""
    pre, mask = build.build_model_and_mask(config)
    mesh = mesh_of(shape)
    tx, _ = optim.make_optimizer(config, partition(pre.params, mask)[0], config.train.steps)
    state, state_sh = build.sharded_state(pre, mask, tx, config, mesh, sharding.rules_from_config(config.mesh.rules))
    mngr = checkpoint.make_manager(workdir, config.train)
    state, _ = checkpoint.restore(mngr, step, state)
    mngr.close()
    return state, state_sh


@pytest.mark.slow
def test_checkpoint_moves_between_meshes(tmp_path, tiny_llama_dir, chat_data):
    mesh_cfg = lambda d, f, t: {'mesh.data': d, 'mesh.fsdp': f, 'mesh.tensor': t, 'train.batch_size': 8}
    ref, moved = str(tmp_path / 'ref'), str(tmp_path / 'moved')
    train_and_evaluate(tiny_config(tiny_llama_dir, chat_data, **mesh_cfg(1, 8, 1)), ref)
    train_and_evaluate(tiny_config(tiny_llama_dir, chat_data, **mesh_cfg(1, 8, 1)), moved, stop_at=3)

    config = tiny_config(tiny_llama_dir, chat_data, **mesh_cfg(2, 1, 4))
    on_2x4, sh_2x4 = restored_on(config, moved, 3, (2, 1, 4))
    on_1, _ = restored_on(config, moved, 3, (1, 1, 1))
    for a, b, s in zip(jax.tree.leaves((on_2x4.trainable, on_2x4.opt_state)),
                       jax.tree.leaves((on_1.trainable, on_1.opt_state)),
                       jax.tree.leaves((sh_2x4.trainable, sh_2x4.opt_state))):
        assert a.sharding == s  # laid out for the new mesh
        assert np.array_equal(np.asarray(a), np.asarray(b))  # the same values on both meshes
    assert int(on_2x4.step) == int(on_1.step) == 3
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(on_2x4.trainable))
    exported = traverse_util.flatten_dict(build.restore_for_export(moved).params)  # host copy, no mesh
    for path, x in traverse_util.flatten_dict(on_2x4.trainable).items():
        assert np.array_equal(np.asarray(x), exported[path]), path

    # The trainer resumes the fsdp=8 checkpoint on data=2,tensor=4 and continues like the uninterrupted run.
    result = train_and_evaluate(config, moved)
    assert result['step'] == 6
    a, b = losses(ref), losses(moved)
    assert sorted(b) == list(range(1, 7))
    diffs = [abs(a[s] - b[s]) / abs(a[s]) for s in (4, 5, 6)]
    print(f'resumed on another mesh: max relative loss difference {max(diffs):.2e}')
    assert max(diffs) <= RTOL, diffs


# --------------------------------------------------------------------------------------- host offload

OFFLOADS = {'optim.offload_state': ('full', 'opt_state'),  # AdamW's moments; on the device for the update only
            'model.offload_frozen': ('lora', 'frozen')}  # the layers' frozen weights, streamed in per layer


@pytest.mark.slow
@pytest.mark.parametrize('key', list(OFFLOADS))
def test_state_in_host_memory_trains_the_same(tiny_llama_dir, chat_data, tmp_path, key):
    """What `key` offloads lives in pinned_host between steps (fsdp2 x tensor2), and the steps equal the on-device
    ones bit for bit; a run stopped after step 3 resumes into host memory and ends like an uninterrupted run,
    held-out generation (the sampler copies offloaded weights in) included."""
    method, part = OFFLOADS[key]
    config = tiny_config(tiny_llama_dir, chat_data, **{'peft.method': method, 'train.batch_size': 8,
                                                       'eval.generate': 2})
    loss, _, _, params, on_chip = train_steps(config, (1, 2, 2))
    offloaded = override(config, {key: True})
    loss2, _, _, params2, state = train_steps(offloaded, (1, 2, 2))
    pre, _ = build.build_model_and_mask(offloaded)  # greedy decoding from both states: the same tokens
    sampler = Sampler(pre, batch_size=2, mesh=mesh_of((1, 2, 2)))
    tokens = [sampler.sample([[5, 6, 7], [8, 9]], 6, params=s.params()).tokens for s in (on_chip, state)]
    assert tokens[0] == tokens[1]
    host = getattr(state, part)
    if part == 'frozen':  # the layers' matrices; their per-layer norm scales [layers, d] stay on the device
        assert {x.sharding.memory_kind for x in jax.tree.leaves(host) if x.ndim < 3} == {'device'}
        host = [x for x in jax.tree.leaves(host['layers']) if x.ndim >= 3]
    assert {x.sharding.memory_kind for x in jax.tree.leaves(host)} == {'pinned_host'}
    assert {x.sharding.memory_kind for x in jax.tree.leaves(state.trainable)} == {'device'}
    np.testing.assert_array_equal(loss, loss2)
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(x, y)
    whole, parts = str(tmp_path / 'whole'), str(tmp_path / 'parts')
    reference = train_and_evaluate(config, whole)
    assert train_and_evaluate(offloaded, parts, stop_at=3)['step'] == 3
    result = train_and_evaluate(offloaded, parts)
    assert result['step'] == config.train.steps and losses(whole) == losses(parts)
    assert result['gen/examples'] == reference['gen/examples'] == 2  # the held-out answers were generated
