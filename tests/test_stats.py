"""ftjax.stats against values known by hand and against scipy: bootstrap intervals over seeds and over examples,
differences to a baseline."""
import itertools

import numpy as np
import pytest
import scipy.stats

from ftjax import stats


def test_three_seeds_bootstrap_interval_is_min_max():
    """27 equally likely resamples of 3 seeds: the all-smallest and all-largest have 1/27 = 3.7% each, more than
    the 2.5% tails, so the 95% percentile interval is exactly [min, max]; the mean and std are the plain ones."""
    s = stats.summarize([0.81, 0.78, 0.86])
    assert (s.n, s.over) == (3, 'seeds')
    assert s.lo == pytest.approx(0.78) and s.hi == pytest.approx(0.86)
    assert s.mean == pytest.approx(0.8166666666666667) and s.std == pytest.approx(np.std([0.81, 0.78, 0.86], ddof=1))


def test_bootstrap_distribution_matches_the_enumerated_one():
    """The resampled means of [1, 2, 4] have the exact distribution of the 27 ordered triples."""
    values = [1.0, 2.0, 4.0]
    exact = {}
    for triple in itertools.product(values, repeat=3):
        m = round(sum(triple) / 3, 9)
        exact[m] = exact.get(m, 0) + 1 / 27
    means = np.round(stats.bootstrap_means(values, resamples=200_000, seed=1), 9)
    got = {m: float(np.mean(means == m)) for m in exact}
    assert set(np.unique(means)) == set(exact)
    for m, p in exact.items():  # within 5 standard errors of each frequency
        assert abs(got[m] - p) < 5 * np.sqrt(p * (1 - p) / 200_000), (m, got[m], p)


def test_interval_of_twenty_values_agrees_with_scipy():
    x = np.random.default_rng(0).normal(0.8, 0.05, size=20)
    lo, hi = stats.mean_interval(x, resamples=50_000)
    ref = scipy.stats.bootstrap((x,), np.mean, method='percentile', n_resamples=50_000, random_state=0)
    assert lo == pytest.approx(ref.confidence_interval.low, abs=2e-3)
    assert hi == pytest.approx(ref.confidence_interval.high, abs=2e-3)
    assert lo < x.mean() < hi


def test_interval_over_examples_is_the_binomial_one():
    """One run, accuracy 0.8 on 872 examples: the bootstrap over the examples is Binomial(872, 0.8) / 872, whose
    2.5% / 97.5% quantiles scipy gives exactly (the resampled interval within one example of them)."""
    s = stats.summarize([0.8], examples=872)
    assert s.over == 'examples' and s.n == 1 and s.std == 0.0
    lo, hi = scipy.stats.binom.ppf([0.025, 0.975], 872, 0.8) / 872
    assert abs(s.lo - lo) <= 1 / 872 and abs(s.hi - hi) <= 1 / 872
    assert 0.77 < s.lo < 0.8 < s.hi < 0.83  # about +-2.7 points: the finite dev set alone


def test_interval_over_examples_of_several_seeds():
    """Three runs of 0.8 on the same 872 examples: the examples-only interval of their mean is the binomial one
    narrowed by sqrt(3) (three independent resamples averaged); the seed interval is a point."""
    s = stats.summarize([0.8, 0.8, 0.8], examples=872)
    assert s.over == 'seeds' and s.lo == s.hi == pytest.approx(0.8)
    one = stats.summarize([0.8], examples=872)
    width, single = s.examples_hi - s.examples_lo, one.examples_hi - one.examples_lo
    assert width == pytest.approx(single / np.sqrt(3), rel=0.1)
    assert stats.summarize([0.8, 2.5]).examples_lo is None  # not shares of examples: no such interval


def test_one_value_without_examples_has_no_interval():
    s = stats.summarize([0.5])
    assert s.over == 'none' and s.lo == s.hi == 0.5
    assert stats.difference([0.5], [0.4, 0.45]) is None and stats.differs(None) is None


def test_difference_to_a_baseline():
    far = stats.difference([0.90, 0.91, 0.92], [0.80, 0.81, 0.82])
    assert far[0] == pytest.approx(0.1) and far[1] > 0 and stats.differs(far)
    near = stats.difference([0.80, 0.84, 0.79], [0.81, 0.80, 0.83])
    assert near[1] < 0 < near[2] and not stats.differs(near)
    # single runs: over their examples (two accuracies on 872 examples, 1 point apart: inside the noise)
    one = stats.difference([0.81], [0.80], examples=872, baseline_examples=872)
    assert one[1] < 0 < one[2] and not stats.differs(one)
    # the same gap with 100 seeds each is resolved
    rng = np.random.default_rng(0)
    many = stats.difference(0.81 + 0.005 * rng.standard_normal(100), 0.80 + 0.005 * rng.standard_normal(100))
    assert stats.differs(many)


def test_paired_difference_cancels_what_a_seed_does_to_both_sides():
    """Seeds that move every configuration alike (here by 10 points each) hide a steady 2-point gap from the
    unpaired interval; the per-seed differences are -0.02 each, so the paired interval is exactly that."""
    base, other = [0.70, 0.80, 0.90], [0.68, 0.78, 0.88]
    unpaired = stats.difference(other, base)
    assert unpaired[1] < 0 < unpaired[2] and not stats.differs(unpaired)
    paired = stats.paired_difference(other, base)
    assert paired == pytest.approx((-0.02, -0.02, -0.02)) and stats.differs(paired)
    # by hand: the bootstrap of the mean of the differences (-0.03, +0.01, -0.04); 3 pairs: [min, max]
    d, lo, hi = stats.paired_difference([0.67, 0.81, 0.86], base)
    assert (d, lo, hi) == pytest.approx((-0.02, -0.04, 0.01)) and not stats.differs((d, lo, hi))
    assert (lo, hi) == pytest.approx(stats.mean_interval([-0.03, 0.01, -0.04]))
    with pytest.raises(ValueError, match='two equally long lists of 2 or more'):
        stats.paired_difference([0.5, 0.6], [0.5, 0.6, 0.7])
    with pytest.raises(ValueError, match='two equally long lists of 2 or more'):
        stats.paired_difference([0.5], [0.6])


def test_resampling_is_seeded_and_bad_input_is_refused():
    assert stats.mean_interval([1.0, 2.0, 3.0, 5.0]) == stats.mean_interval([1.0, 2.0, 3.0, 5.0])
    with pytest.raises(ValueError, match='between 0 and 1'):
        stats.summarize([1.0, 2.0], level=95)
    with pytest.raises(ValueError, match='at least one'):
        stats.summarize([])
    with pytest.raises(ValueError, match='0 <= p <= 1'):
        stats.proportion_interval(1.5, 10)
