"""ftjax's GRPO losses against TRL's `GRPOTrainer._compute_loss` (trl in the test extras only), on a fixed batch
with non-zero advantages, beta > 0 and importance ratios on both sides of the clip range: the loss to 1e-6 and
its gradient with respect to the per-token log-probs to 1e-5 (float32), for every `align.loss` and both
importance-sampling levels."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax.objectives import grpo

torch = pytest.importorskip('torch')
trl_grpo = pytest.importorskip('trl.trainer.grpo_trainer')

B, T, MAX_LEN = 6, 9, 12
EPS_LOW, EPS_HIGH, BETA = 0.2, 0.28, 0.04


def fixed_batch(seed=0):
    rng = np.random.default_rng(seed)
    logps = rng.uniform(-4.0, -0.2, (B, T)).astype(np.float32)
    shift = np.array([-0.5, 0.5, 0.1, 0.4, -0.4, 0.0])[:, None]  # per row: ratios clipped at the sequence level too
    old = (logps + shift + rng.uniform(-0.5, 0.5, (B, T))).astype(np.float32)  # ratios from ~0.4 to ~2.7
    ref = (logps + rng.normal(0, 0.3, (B, T))).astype(np.float32)
    adv = np.array([1.3, -0.7, 0.4, -1.5, 0.9, -0.2], np.float32)
    lengths = np.array([9, 4, 7, 1, 6, 8])
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
    return logps, old, ref, adv, mask


class _Accelerator:
    num_processes = 1

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction='sum'):
        return x


def trl_loss_and_grad(loss_type, level, batch):
    """TRL's `_compute_loss` on the batch, the model's per-token log-probs replaced by a leaf tensor."""
    logps, old, ref, adv, mask = (torch.tensor(x) for x in batch)
    leaf = logps.clone().requires_grad_(True)
    fake = types.SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=BETA,
        loss_type=loss_type, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, use_vllm=False,
        vllm_importance_sampling_correction=False, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=MAX_LEN, accelerator=_Accelerator(),
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics={'train': __import__('collections').defaultdict(list)},
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1))
    fake._get_per_token_logps_and_entropies = lambda *a, **k: (leaf, torch.zeros_like(leaf), None)
    inputs = {'prompt_ids': torch.zeros((B, 1), dtype=torch.long), 'prompt_mask': torch.ones((B, 1)),
              'completion_ids': torch.zeros((B, T), dtype=torch.long), 'completion_mask': mask, 'advantages': adv,
              'old_per_token_logps': old, 'ref_per_token_logps': ref, 'num_items_in_batch': mask.sum()}
    loss = trl_grpo.GRPOTrainer._compute_loss(fake, None, inputs)
    loss.backward()
    return float(loss.detach()), leaf.grad.numpy(), fake._metrics['train']


def ftjax_loss_and_grad(loss_type, level, batch):
    logps, old, ref, adv, mask = (jnp.asarray(x) for x in batch)
    s = grpo.Settings(loss_type, BETA, EPS_LOW, EPS_HIGH, level, MAX_LEN, 1)
    norms = grpo.normalisers({'loss_mask': mask})

    def f(lp):
        return grpo.loss_and_sums(s, lp, old, ref, adv, mask, *norms)

    (loss, sums), grad = jax.value_and_grad(f, has_aux=True)(logps)
    _, metrics = grpo.finalize(sums)
    return float(loss), np.asarray(grad), metrics


FAST = {('grpo', 'token'), ('dapo', 'sequence')}  # the fast lane's two; every pair runs in CI (slow)


@pytest.mark.parametrize('loss_type,level', [
    case if case in FAST else pytest.param(*case, marks=pytest.mark.slow)
    for case in [(loss, level) for loss in grpo.LOSSES for level in grpo.LEVELS]])
def test_loss_and_gradient_equal_trl(loss_type, level):
    batch = fixed_batch()
    ratio = np.exp(batch[0] - batch[1])[batch[4] > 0]
    assert (ratio < 1 - EPS_LOW).any() and (ratio > 1 + EPS_HIGH).any()  # both sides of the clip range
    want, want_grad, trl_metrics = trl_loss_and_grad(loss_type, level, batch)
    got, got_grad, metrics = ftjax_loss_and_grad(loss_type, level, batch)
    assert abs(got - want) <= 1e-6 * max(1.0, abs(want)), (got, want)
    assert np.max(np.abs(got_grad - want_grad)) <= 1e-5, np.max(np.abs(got_grad - want_grad))
    assert np.abs(want_grad).max() > 1e-3  # the gradient is not trivially zero
    for name in ('clip_ratio/low_mean', 'clip_ratio/high_mean', 'clip_ratio/region_mean', 'kl'):
        assert float(metrics[name]) == pytest.approx(trl_metrics[name][0], abs=1e-6), name
    assert float(metrics['clip_ratio/low_mean']) > 0 and float(metrics['clip_ratio/high_mean']) > 0


def test_ratio_one_means_no_clipping_and_policy_gradient():
    """old = current log-probs: ratio 1, nothing clipped, and the gradient is -A / n per token (grpo)."""
    logps, _, _, adv, mask = fixed_batch()
    s = grpo.Settings('grpo', 0.0, EPS_LOW, EPS_HIGH, 'token', MAX_LEN, 1)
    lp = jnp.asarray(logps)
    norms = grpo.normalisers({'loss_mask': jnp.asarray(mask)})
    (loss, sums), grad = jax.value_and_grad(
        lambda x: grpo.loss_and_sums(s, x, lp, None, jnp.asarray(adv), jnp.asarray(mask), *norms), has_aux=True)(lp)
    _, m = grpo.finalize(sums)
    assert float(m['clip_ratio/region_mean']) == 0.0 and float(m['ratio_mean']) == 1.0
    want = -adv[:, None] * mask / mask.sum(-1, keepdims=True) / B
    np.testing.assert_allclose(np.asarray(grad), want, atol=1e-7)
    assert float(loss) == pytest.approx(-adv.mean(), abs=1e-6)
