"""Mixture-of-experts decoders (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, Granite-MoE) against transformers float32 on
tiny random checkpoints written by `save_pretrained` (the hub's per-expert layout).

Logits and the load-balancing loss (transformers' `aux_loss` with output_router_logits) to 1e-5, on both expert
paths (ragged_dot over tokens sorted by expert, and every expert on every token); greedy decoding; the train
step with LoRA on attention and experts (one adapter per expert), with the router frozen, and full fine-tuning;
the Hugging Face export of a trained model read back by transformers; refusals of what the decoder lacks.
"""
import dataclasses
import json
import os
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import ftjax
from ftjax import export, peft, sharding
from ftjax import state as state_lib
from ftjax.config import DEFAULT_RULES
from ftjax.errors import ConfigError, ModelError
from ftjax.models import LlamaConfig, abstract_variables, build_model, load_pretrained, moe
from tests import tiny

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

TOL = 1e-5
SEQ = 12
FAMILIES = tiny.MOE_FAMILIES
# Fields that, reverted to the dense Llama's value, must move the logits (each family sets some of them)
REVERT = dict(norm_topk_prob=False, clip_qkv=None, embed_multiplier=None, residual_multiplier=None,
              logits_scaling=None, query_scale=None, sliding_window=None)


@pytest.fixture(scope='module')
def moe_dir(tmp_path_factory):
    made = {}

    def get(family):
        if family not in made:
            made[family] = tiny.make_moe_checkpoint(str(tmp_path_factory.mktemp(family)), family)
        return made[family]
    return get


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def ids_of(cfg, shape=(2, SEQ), seed=0):
    return np.random.RandomState(seed).randint(0, cfg.vocab_size, shape)


def forward(cfg, params, ids, **over):
    """(logits, load-balancing loss) of ftjax's model with `over` replaced in its config."""
    model = build_model(dataclasses.replace(cfg, **over))
    logits, state = model.apply({'params': params}, ids, mutable=['intermediates'])
    return np.asarray(logits), float(moe.aux_losses(state['intermediates']['router'], cfg.num_experts)['load_balance'])


@pytest.mark.parametrize('family', [f if f in ('qwen2_moe', 'granitemoe') else pytest.param(f, marks=pytest.mark.slow)
                                    for f in FAMILIES])
def test_logits_and_aux_loss_match_transformers(moe_dir, family):
    path = moe_dir(family)
    model, params, _, cfg = load_pretrained(path)
    assert cfg.model_type == family and cfg.num_experts == FAMILIES[family][2].get(
        'num_experts', FAMILIES[family][2].get('num_local_experts'))
    ids = ids_of(cfg)
    with torch.no_grad():
        out = hf_model(path)(torch.tensor(ids), output_router_logits=True)
    theirs, their_aux = out.logits.numpy(), float(out.aux_loss)
    whole = cfg.num_experts / cfg.experts_per_token  # capacity factor at which nothing is dropped
    for impl in moe.IMPLS:
        ours, aux = forward(cfg, params, ids, moe_impl=impl, moe_capacity_factor=whole)
        err = np.abs(ours - theirs).max()
        print(f'{family} {impl}: max |d logits| {err:.2e} (logits up to {np.abs(theirs).max():.1f}), '
              f'aux loss {aux:.6f} vs {their_aux:.6f}')
        assert err < TOL and abs(aux - their_aux) < TOL
    for field, value in REVERT.items():  # every family field this model sets is exercised
        if getattr(cfg, field) != value and not (field == 'norm_topk_prob' and cfg.router == 'topk_softmax'):
            other, _ = forward(cfg, params, ids, **{field: value})
            assert np.abs(other - theirs).max() > 100 * TOL, field


@pytest.mark.slow  # 16.6 s cold; the fast lane keeps both paths' logits against transformers (above)
@pytest.mark.parametrize('impl', ['ragged', 'capacity'])
def test_expert_paths_agree_with_expert_lora(moe_dir, impl):
    """Loss and gradients of the ragged and capacity paths (capacity factor experts / k: nothing dropped) equal
    the dense path's, with adapters on every expert (non-zero B) and padding rows; a capacity of half the
    tokens drops some."""
    pre = load_pretrained(moe_dir('qwen2_moe'))
    c = tiny.lora_test_config()
    p, _ = peft.prepare(pre, c, jax.random.key(0))
    params = jax.tree_util.tree_map_with_path(  # B = 0 at init would hide the adapters' path
        lambda path, x: x + 0.05 * jax.random.normal(jax.random.key(len(path)), x.shape)
        if path[-1].key == 'lora_b' else x, p.params)
    ids = ids_of(pre.config, (3, SEQ), seed=5)
    seg = np.ones_like(ids)
    seg[2, 7:] = 0  # padding: out of the routing statistics
    whole = p.config.num_experts / p.config.experts_per_token

    def loss(prm, impl, factor=whole):
        model = build_model(dataclasses.replace(p.config, moe_impl=impl, moe_capacity_factor=factor))
        logits, state = model.apply({'params': prm}, ids, None, seg, mutable=['intermediates'])
        aux = moe.aux_losses(state['intermediates']['router'], p.config.num_experts)
        return jnp.mean(jnp.square(logits) * seg[..., None]) + aux['load_balance']
    run = jax.jit(jax.value_and_grad(loss), static_argnums=(1, 2))
    want_l, want_g = run(params, 'dense')
    want = traverse_util.flatten_dict(want_g)
    assert ('layers', 'moe', 'gate_proj', 'lora_a') in want
    got_l, got_g = run(params, impl)
    np.testing.assert_allclose(got_l, want_l, rtol=1e-6, err_msg=impl)
    got = traverse_util.flatten_dict(got_g)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(want[k]).max())),
                                   err_msg=f"{impl}: {'/'.join(k)}")
    if impl == 'capacity':  # a capacity of half the tokens drops some, and the metric says how many
        dropped, _ = run(params, 'capacity', 0.5)
        assert np.isfinite(dropped) and abs(float(dropped) - float(want_l)) > 1e-4
        for factor, some in ((whole, False), (0.5, True)):  # the metric: the fraction past the slots
            model = build_model(dataclasses.replace(p.config, moe_impl='capacity', moe_capacity_factor=factor))
            _, state = model.apply({'params': params}, ids, None, seg, mutable=['intermediates'])
            frac = float(moe.aux_losses(state['intermediates']['router'], p.config.num_experts)['dropped'])
            assert (0.0 < frac < 1.0) if some else frac == 0.0, (factor, frac)


@pytest.mark.parametrize('family', ['mixtral', pytest.param('olmoe', marks=[pytest.mark.slow, pytest.mark.variants])])
def test_greedy_generation_matches_transformers(moe_dir, family):
    _, _, ours, theirs = tiny.greedy_against_transformers(moe_dir(family))
    assert ours == theirs


def train(pre, c, steps=3):
    """`pre` after `steps` real train steps of config `c`; (trained Pretrained, per-step metrics)."""
    p, _, _, _, state, step = tiny.build(pre, c)
    ids = ids_of(pre.config, (2, SEQ + 1), seed=2).astype(np.int32)
    batch = {'input_ids': ids[:, :-1], 'target_ids': ids[:, 1:], 'loss_mask': np.ones((2, SEQ), np.float32)}
    history = []
    for i in range(steps):
        state, metrics = step(state, batch, jax.random.key(i))
        history.append({k: float(v) for k, v in metrics.items()})
    trained = dataclasses.replace(p, params=jax.device_get(state_lib.combine(state.trainable, state.frozen)))
    return trained, history, state


@pytest.mark.slow  # ~17 s; test_peft_export_of_expert_adapters_alone stays in the fast lane
def test_lora_on_experts_trains_and_exports_merged(moe_dir, tmp_path):
    """One adapter per expert, stacked on the expert axis; the loss includes the load-balancing term (reported);
    the merged Hugging Face export reads back in transformers with ftjax's logits, and so does the PEFT adapter
    (attention as target_modules, the fused experts as peft's target_parameters) on transformers' base model."""
    path = moe_dir('qwen3_moe')
    pre = load_pretrained(path)
    trained, history, state = train(pre, tiny.lora_test_config(**{'model.router_aux_loss_coef': 0.5}))
    flat = traverse_util.flatten_dict(trained.params)
    e, d = pre.config.num_experts, pre.config.hidden_size
    assert flat[('layers', 'moe', 'gate_proj', 'lora_a')].shape == (2, e, d, 4)
    assert flat[('layers', 'moe', 'down_proj', 'lora_b')].shape == (2, e, 4, d)
    assert ('layers', 'moe', 'router', 'lora_a') not in flat  # the router is not adapted
    assert not any(k[-1] != 'lora_a' and k[-1] != 'lora_b' for k in traverse_util.flatten_dict(state.trainable))
    first, last = history[0], history[-1]
    assert last['loss'] < first['loss'] and first['router_aux_loss'] > 1.0  # k=2 when balanced
    _, without, _ = train(pre, tiny.lora_test_config(**{'model.router_aux_loss_coef': 0.0}), steps=1)
    np.testing.assert_allclose(first['loss'] - without[0]['loss'], 0.5 * first['router_aux_loss'], rtol=1e-5)
    assert first['expert_load_max'] >= 1.0 >= first['expert_load_min']
    ids = ids_of(pre.config, seed=3)
    ours = np.asarray(trained.model.apply({'params': trained.params}, ids))
    with torch.no_grad():
        base = hf_model(path)(torch.tensor(ids)).logits.numpy()
        assert np.abs(ours - base).max() > 100 * TOL  # the experts' adapters moved the model
        out = export.export_hf(trained, str(tmp_path / 'hf'))
        back = hf_model(out)(torch.tensor(ids)).logits.numpy()
    print(f'qwen3_moe LoRA export: max |d logits| {np.abs(ours - back).max():.2e}')
    assert np.abs(ours - back).max() < 1e-4
    adapter = export.export_peft(trained, str(tmp_path / 'peft'))
    assert np.abs(_peft_logits(path, adapter, ids) - ours).max() < 1e-4
    with pytest.raises(ModelError, match=r"target_parameters=\['mlp.experts.gate_up_proj', 'mlp.experts.down_proj'\] "
                                         r"is not supported by ftjax"):
        ftjax.load_pretrained(path, adapter=adapter)  # not read back into ftjax: one clear error


def _peft_logits(path, adapter, ids):
    """transformers' model of `path` with the PEFT adapter directory `adapter` loaded by peft: its logits."""
    peft_lib = pytest.importorskip('peft')
    with open(os.path.join(adapter, 'adapter_config.json')) as f:
        assert json.load(f)['target_parameters']  # the experts' adapters ride on peft's ParamWrapper
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')  # peft: target_parameters is experimental
        model = peft_lib.PeftModel.from_pretrained(hf_model(path), adapter).eval()
        return model(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize('family,targets', [
    ('granitemoe', ['gate_up_proj$']),  # transformers' fused layout is ftjax's too: no rank padding
    pytest.param('mixtral', ['down_proj$', 'up_proj$'], marks=pytest.mark.slow),  # up without gate: half zeros
])
def test_peft_export_of_expert_adapters_alone(moe_dir, family, targets, tmp_path):
    """Adapters on the experts only (no target_modules) export to a PEFT adapter that peft applies to
    transformers' fused expert parameters with ftjax's logits."""
    path = moe_dir(family)
    trained, _, _ = train(load_pretrained(path), tiny.lora_test_config(**{'peft.lora.targets': targets}), steps=2)
    ids = ids_of(trained.config, seed=4)
    ours = np.asarray(trained.model.apply({'params': trained.params}, ids))
    adapter = export.export_peft(trained, str(tmp_path / 'peft'))
    err = np.abs(_peft_logits(path, adapter, ids) - ours).max()
    print(f'{family} PEFT export of expert adapters: max |d logits| {err:.2e}')
    assert err < 1e-4


@pytest.mark.parametrize('objective', [pytest.param('simpo', marks=pytest.mark.slow), 'grpo'])
def test_preference_and_grpo_steps_add_the_load_balancing_loss(moe_dir, objective):
    """SimPO and GRPO on a MoE model (LoRA on the experts): the step's loss is the objective's + coef x load
    balance, and the routing metrics are reported, as in the LM objective."""
    pre = load_pretrained(moe_dir('mixtral'))
    t = SEQ
    ids = ids_of(pre.config, (2, t + 1), seed=8).astype(np.int32)
    batch = {'input_ids': ids[:, :-1], 'target_ids': ids[:, 1:]}
    if objective == 'simpo':  # a chosen and a rejected answer per row
        batch.update(segment_ids=np.array([[1] * (t // 2) + [2] * (t // 2)] * 2, np.int32),
                     loss_mask=np.tile(np.array([0, 0] + [1] * (t // 2 - 2), np.float32), (2, 2)),
                     positions=np.tile(np.arange(t // 2, dtype=np.int32), (2, 2)))
    else:  # a prompt and a completion per row, with the rollout's log-probs and advantages
        batch.update(segment_ids=np.ones((2, t), np.int32), positions=np.tile(np.arange(t, dtype=np.int32), (2, 1)),
                     loss_mask=np.tile(np.array([0] * 4 + [1] * (t - 4), np.float32), (2, 1)),
                     old_logps=np.full((2, t), -3.0, np.float32), advantages=np.array([1.0, -1.0], np.float32))
    first = {}
    for coef in (0.5, 0.0):
        c = tiny.lora_test_config(**{'model.router_aux_loss_coef': coef, 'align.loss': objective, 'align.beta': 0.0})
        if objective == 'simpo':
            c.data.format, c.align.reference, c.align.beta = 'preference', 'none', 2.0
        _, _, _, _, state, step = tiny.build(pre, c)
        _, metrics = step(state, batch, jax.random.key(0))
        first[coef] = {k: float(v) for k, v in metrics.items()}
    assert first[0.5]['router_aux_loss'] > 1.0 and 'expert_load_max' in first[0.5]
    np.testing.assert_allclose(first[0.5]['loss'] - first[0.0]['loss'], 0.5 * first[0.5]['router_aux_loss'],
                               rtol=1e-5)


@pytest.mark.slow
@pytest.mark.variants  # CI: full fine-tuning of a MoE runs in test_upcycled_model_... and the compile check
def test_full_and_router_frozen_fine_tuning(moe_dir, tmp_path):
    """Full fine-tuning exports to transformers exactly; partial with the router frozen trains the rest only."""
    path = moe_dir('mixtral')
    pre = load_pretrained(path)
    c = tiny.lora_test_config(**{'peft.method': 'full', 'optim.learning_rate': 1e-3})
    trained, history, _ = train(pre, c)
    assert history[-1]['loss'] < history[0]['loss']
    ids = ids_of(pre.config, seed=3)
    ours = np.asarray(trained.model.apply({'params': trained.params}, ids))
    with torch.no_grad():
        back = hf_model(export.export_hf(trained, str(tmp_path / 'hf')))(torch.tensor(ids)).logits.numpy()
    assert np.abs(ours - back).max() < 1e-4
    for regex, want in (('moe/(gate|up|down)_proj', {f'layers/moe/{m}_proj/kernel' for m in ('gate', 'up', 'down')}),
                        ('router', {'layers/moe/router/kernel'})):  # the router frozen, or only the router
        _, _, state = train(pre, tiny.lora_test_config(**{'peft.method': 'partial', 'peft.trainable': [regex]}), steps=1)
        assert {'/'.join(k) for k in traverse_util.flatten_dict(state.trainable)} == want


@pytest.mark.parametrize('fields,message', [
    ({'decoder_sparse_step': 2}, 'layers without experts among MoE layers'),
    ({'mlp_only_layers': [0]}, 'mlp_only_layers=\\[0\\]'),
])
def test_layers_without_experts_are_refused(fields, message):
    hf = dict(model_type='qwen3_moe', vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, **fields)
    with pytest.raises(ModelError, match=message):
        LlamaConfig.from_hf(hf)


def test_config_round_trip():
    for family, (_, config_cls, extra) in FAMILIES.items():
        hf = getattr(transformers, config_cls)(vocab_size=300, hidden_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, **extra)
        cfg = LlamaConfig.from_hf(hf)
        back = LlamaConfig.from_hf(getattr(transformers, config_cls)(**{k: v for k, v in cfg.to_hf().items()
                                                                        if k != 'model_type'}))
        assert back == cfg, family


@pytest.mark.parametrize('mesh_shape,impl', [
    pytest.param({'data': 2, 'fsdp': 2, 'expert': 2}, 'ragged', marks=pytest.mark.slow),
    ({'expert': 8}, 'ragged'),  # one expert per shard, fewer than k = 2: the shard's assignments capped at tokens
    ({'fsdp': 2, 'expert': 4}, 'all_to_all'),  # each assignment sent to its expert's shard, back, summed
    pytest.param({'expert': 8}, 'all_to_all', marks=[pytest.mark.slow, pytest.mark.variants]),
    pytest.param({'fsdp': 2, 'expert': 4}, 'ragged', marks=[pytest.mark.slow, pytest.mark.variants]),
    pytest.param({'fsdp': 2, 'expert': 4}, 'dense', marks=[pytest.mark.slow, pytest.mark.variants]),
    pytest.param({'fsdp': 2, 'expert': 4}, 'capacity', marks=[pytest.mark.slow, pytest.mark.variants]),
    pytest.param({'data': 2, 'tensor': 2, 'expert': 2}, 'ragged', marks=[pytest.mark.slow, pytest.mark.variants]),
])
def test_expert_sharded_equals_one_device(moe_dir, mesh_shape, impl):
    """The experts split over the 'expert' mesh axis of the 8 fake CPU devices (tokens gathered per expert group,
    sums reduce-scattered), with fsdp / data / tensor: loss (with the load-balancing term) and the gradients of
    every parameter, LoRA on the experts included, equal the unsharded step's. 'all_to_all' is
    model.moe_dispatch='all_to_all' with moe_impl='ragged' and enough slots that nothing is dropped."""
    dispatch = 'all_to_all' if impl == 'all_to_all' else 'gather'
    impl = 'ragged' if impl == 'all_to_all' else impl
    pre = load_pretrained(moe_dir('qwen2_moe'))
    p, _ = peft.prepare(pre, tiny.lora_test_config(), jax.random.key(0))
    params = jax.jit(lambda tree: jax.tree_util.tree_map_with_path(  # jitted: eagerly, every op of it compiles
        lambda path, x: x + 0.05 * jax.random.normal(jax.random.key(len(path)), x.shape)
        if path[-1].key == 'lora_b' else x, tree))(p.params)
    model = build_model(dataclasses.replace(p.config, moe_impl=impl, moe_capacity_factor=8.0,  # nothing dropped
                                            moe_dispatch=dispatch))
    ids = ids_of(pre.config, (8, SEQ), seed=6)

    def loss(prm, x):
        logits, state = model.apply({'params': prm}, x, mutable=['intermediates'])
        aux = moe.aux_losses(state['intermediates']['router'], pre.config.num_experts)
        return jnp.mean(jnp.square(logits)) + aux['load_balance']
    want_l, want_g = jax.jit(jax.value_and_grad(loss))(params, ids)
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[:8])
    rules = sharding.rules_from_config([list(r) for r in DEFAULT_RULES])
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        shards = sharding.param_shardings(sharding.logical_specs(abstract_variables(model)), mesh, rules)
        placed = sharding.place(params, shards)
        got_l, got_g = jax.jit(jax.value_and_grad(loss))(placed, jax.device_put(ids, sharding.batch_sharding(mesh)))
    kernel = placed['layers']['moe']['gate_proj']['kernel']
    assert kernel.sharding.spec[1] == 'expert'  # [layers, experts, embed, mlp]: the experts split
    np.testing.assert_allclose(got_l, want_l, rtol=1e-5)
    flat_got, flat_want = traverse_util.flatten_dict(got_g), traverse_util.flatten_dict(want_g)
    for k in flat_want:
        b = np.asarray(flat_want[k])
        np.testing.assert_allclose(flat_got[k], b, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(b).max())),
                                   err_msg='/'.join(k))


def test_upcycled_model_starts_as_the_dense_one_and_exports_as_mixtral(tmp_path):
    """Sparse upcycling: 4 copies of each MLP, top-2 renormalised, computes what the dense Llama did; after a full
    fine-tuning step it exports as a Mixtral that transformers reads back with ftjax's logits."""
    dense = load_pretrained(tiny.make_llama_checkpoint(str(tmp_path / 'llama')))
    pre = moe.upcycle(dense, experts=4, top_k=2, seed=0)
    assert (pre.config.model_type, pre.config.num_experts, pre.config.experts_per_token) == ('mixtral', 4, 2)
    ids = ids_of(pre.config, seed=7)
    want = np.asarray(dense.model.apply({'params': dense.params}, ids))
    got, _ = forward(pre.config, pre.params, ids)
    assert np.abs(got - want).max() < TOL
    noisy = moe.upcycle(dense, experts=4, top_k=2, noise=0.1, seed=0)
    assert np.abs(forward(noisy.config, noisy.params, ids)[0] - want).max() > 100 * TOL
    trained, _, _ = train(pre, tiny.lora_test_config(**{'peft.method': 'full', 'optim.learning_rate': 1e-3}), steps=1)
    ours = np.asarray(trained.model.apply({'params': trained.params}, ids))
    out = export.export_hf(trained, str(tmp_path / 'hf'))
    with torch.no_grad():
        back = hf_model(out)
        assert type(back).__name__ == 'MixtralForCausalLM'
        assert np.abs(back(torch.tensor(ids)).logits.numpy() - ours).max() < 1e-4
    with pytest.raises(ConfigError, match='already has 4 experts'):
        moe.upcycle(pre, experts=4, top_k=2)
    with pytest.raises(ConfigError, match='upcycle_top_k=5 must be in'):
        moe.upcycle(dense, experts=4, top_k=5)


def test_peft_export_of_attention_and_shared_expert_adapters(moe_dir, tmp_path):
    """Adapters on attention and on Qwen2-MoE's shared expert (nn.Linear modules in transformers) export to a PEFT
    adapter that peft loads onto transformers' model with ftjax's logits."""
    peft_lib = pytest.importorskip('peft')
    path = moe_dir('qwen2_moe')
    c = tiny.lora_test_config(**{'peft.lora.targets': ['(q|k|v|o)_proj$', 'shared_(gate|up|down)_proj$']})
    trained, _, _ = train(load_pretrained(path), c, steps=2)
    ids = ids_of(trained.config, seed=3)
    ours = np.asarray(trained.model.apply({'params': trained.params}, ids))
    adapter = export.export_peft(trained, str(tmp_path / 'peft'))
    with torch.no_grad():
        model = peft_lib.PeftModel.from_pretrained(hf_model(path), adapter).eval()
        err = np.abs(model(torch.tensor(ids)).logits.numpy() - ours).max()
    print(f'qwen2_moe PEFT export (attention + shared expert): max |d logits| {err:.2e}')
    assert err < 1e-4


def test_all_to_all_dispatch_drops_exactly_the_assignments_past_its_slots():
    """model.moe_dispatch='all_to_all' with fewer slots than assignments, on 4 'expert' shards of 8 experts (k=2,
    random routing, one padding token): the output equals the one-device computation with exactly the assignments
    past each source shard's `slots` for each destination shard (in token order) given weight 0, and the count it
    reports is theirs."""
    rng = np.random.default_rng(0)
    ex, e, k, n, d, f = 4, 8, 2, 32, 16, 8  # n tokens in all: 8 per shard
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    idx = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(n)]), jnp.int32)
    w = jnp.asarray(rng.uniform(size=(n, k)), jnp.float32)
    valid = jnp.asarray(np.arange(n) != 5)
    projs = {p: [(jnp.asarray(rng.normal(size=shape) * 0.3, jnp.float32), None)]
             for p, shape in (('gate', (e, d, f)), ('up', (e, d, f)), ('down', (e, f, d)))}
    factor = 0.75
    slots = int(np.ceil(factor * (n // ex) * k / ex))  # 3 per (source, destination) shard pair
    keep = np.ones((n, k), bool)
    for src in range(ex):  # by hand: each source shard's assignments, in token order, per destination shard
        used = [0] * ex
        for t in range(src * n // ex, (src + 1) * n // ex):
            for j in range(k):
                if not valid[t]:
                    continue
                dst = int(idx[t, j]) // (e // ex)
                keep[t, j] = used[dst] < slots
                used[dst] += 1
    want = moe.apply_experts(x, idx, jnp.where(keep, w, 0.0), projs, 'ragged', jax.nn.silu, False, 0, 1.0, e, valid)
    mesh = sharding.make_mesh({'expert': ex}, jax.devices()[:ex])
    with jax.set_mesh(mesh):
        got, dropped = jax.jit(lambda *a: moe.sharded_experts(*a, 'ragged', jax.nn.silu, False, n, factor, valid,
                                                              'all_to_all'))(x, idx, w, projs)
    assert int(dropped) == int((~keep & np.asarray(valid)[:, None]).sum()) > 0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
