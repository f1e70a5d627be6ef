"""Long context (issue 26): RoPE angles exact at any position, remat policies that save, offload to host memory
or recompute named tensors (same gradients as no remat), and their one-line config errors.

The float32-vs-float64 logits of real Gemma 3 and a Llama-3-scaled SmolLM2 at 1k-8k tokens are measured by
scripts/long_context_numerics.py (docs/results/long_context_numerics.md), not here: a float64 transformers run
at 8k tokens takes minutes.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax.config import validate
from ftjax.config_checks import REMAT_PRESETS, remat_places
from ftjax.errors import ConfigError
from ftjax.models import layers, load_pretrained
from tests import tiny
from tests.tiny import build, lm_batch, make_config

LLAMA31 = {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
           'original_max_position_embeddings': 8192}


def _wrapped(angles):
    return np.angle(np.exp(1j * np.asarray(angles, np.float64)))  # in (-pi, pi]


@pytest.mark.parametrize('theta,scaling', [(1e6, None), (1e4, None), (5e5, LLAMA31)], ids=['1e6', '1e4', 'llama3'])
def test_rope_angles_are_exact_at_any_position(theta, scaling):
    """Within 1e-6 rad of float64 up to position 2^20 (and for negative positions), where float32's
    `position * inv_freq` is off by up to half an ulp of the unreduced angle (2.4e-4 rad at 8k already)."""
    inv = layers.rope_frequencies(128, theta, scaling)  # float64
    assert inv.dtype == np.float64
    pos = np.array([[-7, 0, 1, 511, 1400, 8191, 32767, 65535, 131071, 1 << 20]], np.int32)
    exact = _wrapped(pos[..., None].astype(np.float64) * inv)
    ours = np.asarray(layers.rope_angles(jnp.asarray(pos), layers.rope_turns(inv)))
    assert ours.dtype == np.float32 and np.abs(ours).max() <= np.pi + 1e-6
    err = np.abs(_wrapped(ours - exact)).max(-1)[0]  # per position
    naive = np.abs(_wrapped((pos[..., None].astype(np.float32) * inv.astype(np.float32)) - exact)).max(-1)[0]
    print('\nmax angle error per position (rad), ours:', np.array2string(err, precision=1),
          '\nposition * inv_freq in float32:', np.array2string(naive, precision=1))
    assert err.max() < 1e-6
    assert naive[pos[0] == 8191] > 1e-4  # what the old computation lost (a check that the test can tell)


def test_llama3_scaled_frequencies_equal_transformers():
    torch = pytest.importorskip('torch')
    transformers = pytest.importorskip('transformers')
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=131072, rope_parameters={
        'rope_theta': 5e5, **LLAMA31})
    theirs, _ = ROPE_INIT_FUNCTIONS['llama3'](cfg, torch.device('cpu'))
    ours = layers.rope_frequencies(128, 5e5, LLAMA31)
    np.testing.assert_allclose(ours, theirs.double().numpy(), rtol=1e-6)  # theirs: float32 pow, a few ulps


@pytest.fixture(scope='module')
def llama(tiny_llama_dir):
    return load_pretrained(tiny_llama_dir)


CUSTOM = 'custom:layer_input=offload,mlp=device,o_proj=remat,k_proj=offload'
SLOW = pytest.mark.slow


@pytest.mark.parametrize('method,policies', [
    ('lora', ['offload_layer_inputs_and_projections', CUSTOM]),
    pytest.param('lora', ['full', 'save_qkv', 'offload_layer_inputs'], marks=SLOW),
    # LoRA's two cases cover every preset; full fine-tuning under each is a variant (a minute of CI)
    pytest.param('full', ['full', *REMAT_PRESETS, CUSTOM], marks=[SLOW, pytest.mark.variants]),
], ids=['lora', 'lora-more', 'full'])
def test_remat_policies_give_the_gradients_of_no_remat(llama, method, policies):
    """Every preset and a custom policy (tensors on the device, offloaded to host memory, recomputed) trains
    as `remat=none` does: same loss and updated params after one step (AdamW, lr 1e-2: an update of ~1e-2
    per weight, so 1e-5 is float32 rounding of the gradients)."""
    batch = lm_batch(llama.config.vocab_size, seed=3)
    out = {}
    for remat in ['none', *policies]:
        c = make_config(method, **{'model.remat': remat})
        pre, _, _, _, state, step = build(llama, c)
        assert pre.config.remat == remat
        state, metrics = step(state, batch, jax.random.key(0))
        out[remat] = (float(metrics['loss']), jax.device_get(state.trainable))
    loss0, params0 = out['none']
    for remat, (loss, params) in out.items():
        diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(params0), jax.tree.leaves(params)))
        assert loss == pytest.approx(loss0, rel=1e-6) and diff < 1e-5, (remat, loss, loss0, diff)


def test_offload_policy_moves_the_layer_inputs_to_host_memory():
    """The policy itself: a named tensor marked 'offload' is a host-memory residual of the backward pass
    (the jaxpr's device_put to host memory); marked 'device' it is not moved."""
    from jax.ad_checkpoint import checkpoint_name

    def block(w, x):
        return jnp.tanh(checkpoint_name(x, 'layer_input') @ w)

    def loss(policy, w, x):
        return jnp.sum(jax.checkpoint(block, policy=layers.remat_policy(policy))(w, x) ** 2)
    w, x = jnp.ones((8, 8)) / 8, jnp.ones((4, 8))
    text = {p: str(jax.make_jaxpr(jax.grad(lambda w, p=p: loss(p, w, x)))(w))
            for p in ('offload_layer_inputs', 'custom:layer_input=device')}
    host = 'devices=(MemorySpace.Host,)'
    assert host in text['offload_layer_inputs'] and host not in text['custom:layer_input=device']


@pytest.mark.parametrize('value,message', [
    ('fulll', r"config.model.remat='fulll' is not one of \['none', 'full'"),
    ('custom:layer_input=host', r"'layer_input=host' should be TENSOR=PLACE .* PLACE one of \['device', 'offload', "
                                r"'remat'\]"),
    ('custom:attn=device', r"'attn=device' should be TENSOR=PLACE with TENSOR one of \['layer_input'"),
])
def test_bad_remat_is_one_clear_error(value, message, tmp_path):
    c = tiny.tiny_config(str(tmp_path), {'train': 'd', 'eval': None})
    c.model.remat = value
    with pytest.raises(ConfigError, match=message):
        validate(c)
    with pytest.raises(ConfigError, match=message):
        layers.remat_policy(value)


def test_remat_places_expand_groups():
    assert remat_places('full') is None
    assert remat_places('offload_layer_inputs_and_projections') == {
        'layer_input': 'offload', 'q_proj': 'offload', 'k_proj': 'offload', 'v_proj': 'offload',
        'qkv_proj': 'offload', 'o_proj': 'offload'}
