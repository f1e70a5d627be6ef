"""Every decoder family against transformers float32 on tiny random checkpoints written by `save_pretrained`.

gemma3_text, gemma2, qwen3, mistral and phi3: logits (max |delta| < 1e-4) on a sequence three times the sliding
window, with local and global layers; greedy decoding with the KV cache (a prompt + continuation longer than the
window); a LoRA step, its Hugging Face and PEFT exports read back by transformers / peft; partial presets; a
sharded forward/backward; the config fields transformers publishes, and the refusals.

The weights are drawn with initializer_range 0.1 (not transformers' 0.02), so that attention is peaked enough
for every family field to move the logits far beyond the tolerance: each parity test checks that reverting a
field to Llama's value would fail it.
"""
import dataclasses
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import ftjax
from ftjax import export, infer, sharding
from ftjax import state as state_lib
from ftjax.config import DEFAULT_RULES, default_config
from ftjax.errors import ModelError
from ftjax.models import LlamaConfig, abstract_variables, build_model, convert, load_pretrained
from ftjax.objectives import lm
from ftjax.peft.select import LastLayers, trainable_mask
from tests import tiny

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

TOL = 1e-4
WINDOW, SEQ = 4, 12
FAMILIES = {  # model_type -> (transformers class, config class, config fields beyond the shared ones)
    'gemma3_text': ('Gemma3ForCausalLM', 'Gemma3TextConfig', dict(
        head_dim=32, query_pre_attn_scalar=24, num_hidden_layers=3,  # head_dim * heads != hidden_size
        layer_types=['sliding_attention', 'full_attention', 'sliding_attention'],
        rope_parameters={'full_attention': {'rope_type': 'linear', 'factor': 2.0, 'rope_theta': 1000.0},
                         'sliding_attention': {'rope_type': 'default', 'rope_theta': 50.0}})),
    'gemma2': ('Gemma2ForCausalLM', 'Gemma2Config', dict(
        head_dim=32, query_pre_attn_scalar=24, num_hidden_layers=3, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0)),  # layer_types: alternating, from transformers' default
    'qwen3': ('Qwen3ForCausalLM', 'Qwen3Config', dict(
        head_dim=32, use_sliding_window=True, max_window_layers=1, tie_word_embeddings=False)),
    'mistral': ('MistralForCausalLM', 'MistralConfig', {}),  # window on every layer
    'phi3': ('Phi3ForCausalLM', 'Phi3Config', {}),
}
LLAMA_VALUES = dict(sliding_window=None, rope_local_theta=None, rope_scaling=None, attn_softcap=None,
                    final_softcap=None, query_scale=None, embed_scale=False, activation='silu', norm_offset=0.0)


def make_family_checkpoint(path, family, seed=0):
    """A tiny random `family` model (float32) saved by transformers, with the tiny ChatML tokenizer."""
    cls, config_cls, extra = FAMILIES[family]
    tok = tiny.make_tokenizer()
    cfg = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
               sliding_window=WINDOW, initializer_range=0.1, bos_token_id=tok.bos_token_id, eos_token_id=None,
               pad_token_id=tok.pad_token_id)
    cfg.update(extra)
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(getattr(transformers, config_cls)(**cfg))
    tiny._perturb_norms(model, torch)
    return tiny._save(model.eval(), tok, path)


@pytest.fixture(scope='module')
def family_dir(tmp_path_factory):
    made = {}

    def get(family):
        if family not in made:
            made[family] = make_family_checkpoint(str(tmp_path_factory.mktemp(family)), family)
        return made[family]
    return get


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def ids_of(cfg, shape=(2, SEQ), seed=0):
    return np.random.RandomState(seed).randint(0, cfg.vocab_size, shape)


@pytest.mark.parametrize('family', [pytest.param(f, marks=pytest.mark.slow) if f in ('gemma3_text', 'gemma2', 'qwen3') else f
                                    for f in FAMILIES])
def test_logits_match_transformers(family_dir, family):
    path = family_dir(family)
    model, params, _, cfg = load_pretrained(path)
    assert cfg.model_type == family and any(cfg.local_layers)
    ids = ids_of(cfg)
    ours = np.asarray(model.apply({'params': params}, ids))
    theirs = hf_logits(hf_model(path), ids)
    err = np.abs(ours - theirs).max()
    print(f'{family}: max |d logits| = {err:.2e} (logits up to {np.abs(theirs).max():.1f}), seq {SEQ}, '
          f'window {WINDOW}, layers {["local" if x else "global" for x in cfg.local_layers]}')
    assert ours.shape == theirs.shape and err < TOL
    for field, value in LLAMA_VALUES.items():  # every family field this model sets is exercised
        if getattr(cfg, field) != value:
            other = np.asarray(build_model(dataclasses.replace(cfg, **{field: value})).apply({'params': params}, ids))
            assert np.abs(other - theirs).max() > 100 * TOL, field


@pytest.mark.parametrize('family', [f if f in ('mistral', 'gemma3_text') else pytest.param(f, marks=pytest.mark.slow)
                                    for f in FAMILIES])  # the fast lane: Mistral, and Gemma 3's mixed windows
def test_greedy_generation_matches_transformers(family_dir, family):
    """Two prompts in one left-padded batch (KV cache, sliding layers masked by slot) against transformers'
    generate on each alone; the continuation runs past the window, and without the window it would differ."""
    pre, prompts, ours, theirs = tiny.greedy_against_transformers(family_dir(family))
    print(f'{family}: ftjax {ours}\n{" " * len(family)}  transformers {theirs}')
    assert ours == theirs
    cfg = dataclasses.replace(pre.config, sliding_window=None)
    unwindowed = infer.generate(dataclasses.replace(pre, model=build_model(cfg), config=cfg), prompts,
                                max_new_tokens=10, eos_ids=[])
    assert unwindowed != theirs


def lm_batch(cfg, rows=2, seed=2):
    ids = ids_of(cfg, (rows, SEQ + 1), seed).astype(np.int32)
    return {'input_ids': ids[:, :-1], 'target_ids': ids[:, 1:], 'loss_mask': np.ones((rows, SEQ), np.float32)}


def lora_steps(pre, steps=2):
    """`pre` after `steps` LoRA steps of the real train step (every attention and MLP projection adapted)."""
    c = tiny.lora_test_config()
    p, _, _, _, state, step = tiny.build(pre, c)
    batch, losses = lm_batch(pre.config), []
    for i in range(steps):
        state, metrics = step(state, batch, jax.random.key(i))
        losses.append(float(metrics['loss']))
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
    return dataclasses.replace(p, params=jax.device_get(state_lib.combine(state.trainable, state.frozen)))


@pytest.mark.parametrize('family', [f if f == 'gemma3_text' else pytest.param(f, marks=pytest.mark.slow)
                                    for f in FAMILIES])  # the fast lane: Gemma 3 (its logits: the slow lane)
def test_lora_step_and_exports_load_in_transformers_and_peft(family_dir, family, tmp_path):
    peft_lib = pytest.importorskip('peft')
    path = family_dir(family)
    pre = lora_steps(load_pretrained(path))
    cfg = pre.config
    adapted = {'/'.join(p[:-1]) for p in traverse_util.flatten_dict(pre.params) if p[-1] == 'lora_a'}
    fused = {'layers/qkv_proj', 'layers/o_proj', 'layers/gate_up_proj', 'layers/down_proj'}
    assert adapted == (fused if family == 'phi3' else {f'layers/{m}_proj' for m in
                                                        ('q', 'k', 'v', 'o', 'gate', 'up', 'down')})
    ids = ids_of(cfg, seed=3)
    ours = np.asarray(pre.model.apply({'params': pre.params}, ids))
    base = hf_model(path)
    assert np.abs(ours - hf_logits(base, ids)).max() > 100 * TOL  # the steps moved the model
    out = export.export_hf(pre, str(tmp_path / 'hf'))
    with open(os.path.join(out, 'config.json')) as f:
        written = json.load(f)
    assert written['architectures'] == [FAMILIES[family][0]] and written['model_type'] == family
    hf_err = np.abs(ours - hf_logits(hf_model(out), ids)).max()
    adapter = export.export_peft(pre, str(tmp_path / 'peft'))
    peft_err = np.abs(ours - hf_logits(peft_lib.PeftModel.from_pretrained(base, adapter).eval(), ids)).max()
    print(f'{family}: export max |d logits| hf {hf_err:.2e}, peft {peft_err:.2e}')
    assert hf_err < TOL and peft_err < TOL
    back = ftjax.load_pretrained(path, adapter=adapter)  # and the adapter back into ftjax
    np.testing.assert_allclose(np.asarray(back.model.apply({'params': back.params}, ids)), ours, atol=TOL)


@pytest.mark.parametrize('family', ['gemma3_text', 'phi3'])
def test_partial_presets_select_the_family_params(family_dir, family):
    """last_n_blocks covers every stacked leaf (fused projections, q/k norms, post-norms); norms=True every norm."""
    pre = load_pretrained(family_dir(family))
    c = default_config()
    c.peft.method, c.peft.last_n_blocks, c.peft.norms = 'partial', 1, True
    flat = {'/'.join(p): m for p, m in traverse_util.flatten_dict(
        trainable_mask(pre.params, c.peft, pre.config.num_layers)).items()}
    norms = {p for p in flat if 'norm' in p}
    want_norms = {'final_norm/scale', 'layers/attn_norm/scale', 'layers/mlp_norm/scale'}
    if family == 'gemma3_text':
        want_norms |= {f'layers/{n}/scale' for n in ('attn_post_norm', 'mlp_post_norm', 'q_norm', 'k_norm')}
    assert norms == want_norms and all(flat[p] is True for p in norms)
    blocks = {p: m for p, m in flat.items() if p.startswith('layers/') and p not in norms}
    assert blocks and all(m == LastLayers(1) for m in blocks.values())
    assert flat['embed/embedding'] is False
    if family == 'phi3':
        assert {'layers/qkv_proj/kernel', 'layers/gate_up_proj/kernel'} <= set(blocks)


def test_loss_applies_the_final_softcap(family_dir):
    """The chunked training loss (hidden states x head, no logits kept) soft-caps as the model's logits do,
    and its custom gradient equals autodiff through the capped logits."""
    pre = load_pretrained(family_dir('gemma2'))
    model, params, cfg = pre.model, pre.params, pre.config
    batch = lm_batch(cfg, rows=2)

    def reference(p):
        logits = model.apply({'params': p}, batch['input_ids'])  # soft-capped by the model
        lp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.sum(jnp.take_along_axis(lp, batch['target_ids'][..., None], axis=-1))

    ours = lambda p: lm.forward(model, p, batch, loss_chunk=8)[0]
    (l1, g1), (l2, g2) = [jax.jit(jax.value_and_grad(f))(params) for f in (ours, reference)]
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    uncapped = dataclasses.replace(cfg, final_softcap=None)
    assert abs(lm.forward(build_model(uncapped), params, batch)[0] - l2) > 1e-2


def test_sharded_forward_and_gradients_equal_one_device(family_dir):
    """Gemma 3 (q/k norms, post-norms, mixed local / global layers) on a data=2 x fsdp=2 x tensor=2 mesh of the
    8 fake CPU devices, parameters placed by the default rules: the loss and its gradients of one device."""
    pre = load_pretrained(family_dir('gemma3_text'))
    model, cfg = pre.model, pre.config
    ids = ids_of(cfg, (4, SEQ), seed=4)
    loss = jax.jit(jax.value_and_grad(lambda p, x: jnp.mean(model.apply({'params': p}, x) ** 2)))
    want_l, want_g = loss(pre.params, ids)
    mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2}, jax.devices()[:8])
    rules = sharding.rules_from_config([list(r) for r in DEFAULT_RULES])
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        shards = sharding.param_shardings(sharding.logical_specs(abstract_variables(model)), mesh, rules)
        params = sharding.place(pre.params, shards)
        got_l, got_g = loss(params, jax.device_put(ids, sharding.batch_sharding(mesh)))
    assert not params['layers']['q_proj']['kernel'].sharding.is_fully_replicated
    np.testing.assert_allclose(got_l, want_l, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):  # the tied embedding's reach 7.6e3: float32
        # sums in another order move its elements by up to 7e-7 of that (5e-3), 1.2e-4 of a small element
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * max(1.0, float(np.abs(b).max())))


# --- the config fields transformers publishes, and what is refused ------------------------------------------

def test_published_config_layouts():
    """transformers 4 (rope_theta / rope_scaling / rope_local_base_freq, no layer_types) and 5 (rope_parameters
    per layer type) layouts of a Gemma 3 config give the same decoder; to_hf writes the fields back."""
    common = dict(model_type='gemma3_text', vocab_size=300, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                  query_pre_attn_scalar=256, sliding_window=512, hidden_activation='gelu_pytorch_tanh')
    old = LlamaConfig.from_hf({**common, 'rope_theta': 1_000_000.0, 'rope_local_base_freq': 10_000.0,
                               'rope_scaling': {'rope_type': 'linear', 'factor': 8.0}})
    new = LlamaConfig.from_hf({**common, 'rope_parameters': {
        'full_attention': {'rope_type': 'linear', 'factor': 8.0, 'rope_theta': 1_000_000.0},
        'sliding_attention': {'rope_type': 'default', 'rope_theta': 10_000.0}}})
    assert old == new
    assert new.local_layers == (True,) * 5 + (False, True)  # five of every six layers local
    assert (new.rope_theta, new.rope_local_theta, new.query_scale) == (1_000_000.0, 10_000.0, 1 / 16)
    assert (new.norm_offset, new.post_norms, new.embed_scale, new.qk_norm, new.activation) == \
        (1.0, True, True, True, 'gelu_tanh')
    assert LlamaConfig.from_hf({**common, **new.to_hf()}) == new
    hf = transformers.Gemma3TextConfig(**{k: v for k, v in new.to_hf().items() if k != 'model_type'})
    assert LlamaConfig.from_hf(hf) == new  # transformers' own object reads back the same
    qwen = LlamaConfig.from_hf({**common, 'model_type': 'qwen3', 'use_sliding_window': False,
                                'hidden_act': 'silu'})
    assert qwen.sliding_window is None and qwen.qk_norm and qwen.norm_offset == 0.0


@pytest.mark.parametrize('fields,message', [
    ({'model_type': 'phi3', 'rope_scaling': {'rope_type': 'longrope', 'short_factor': [1.0], 'long_factor': [2.0]}},
     "rope_type 'longrope' is not supported"),
    ({'model_type': 'phi3', 'partial_rotary_factor': 0.75}, 'partial_rotary_factor=0.75'),
    ({'model_type': 'llama', 'rope_scaling': {'rope_type': 'yarn', 'factor': 4.0}}, "rope_type 'yarn'"),
    ({'model_type': 'gemma2', 'hidden_activation': 'relu'}, "hidden_act 'relu' is not supported"),
    ({'model_type': 'gemma2', 'layer_types': ['sliding_attention']}, 'layer_types must list 2 entries'),
])
def test_unsupported_variants_are_refused(fields, message):
    hf = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              sliding_window=4, **fields)
    with pytest.raises(ModelError, match=message):
        LlamaConfig.from_hf(hf)


def test_unknown_model_type_lists_the_supported(tmp_path, family_dir):
    d = shutil.copytree(family_dir('mistral'), tmp_path / 'm')
    cfg = json.loads((d / 'config.json').read_text())
    (d / 'config.json').write_text(json.dumps({**cfg, 'model_type': 'mamba'}))
    with pytest.raises(ModelError, match="model_type 'mamba' is not supported. Supported architectures: .*gemma2, "
                                         "gemma3_text, granitemoe, llama, mistral, mixtral, olmoe, phi3, qwen2, qwen2_moe, "
                                         "qwen3, qwen3_moe"):
        load_pretrained(str(d))
    assert {convert.DECODERS[f] for f in FAMILIES} == {v[0] for v in FAMILIES.values()}
