"""Is a difference real? Means, standard deviations and 95% bootstrap intervals of repeated runs.

Two sources of noise, two intervals (`ftjax.report` prints both where it can):
  over seeds     the runs of one configuration with different `train.seed` (init of new parts, data order,
                 dropout, sampling): the percentile bootstrap of the mean over the seeds (`mean_interval`).
  over examples  one run's held-out set: a metric that is the share of examples right (accuracy, exact
                 match) out of `n` is resampled as n examples drawn with replacement (`proportion_interval`),
                 i.e. Binomial(n, p) / n; the interval of the test set's finite size.
A configuration differs from a baseline when the 95% interval of the difference of their means excludes 0
(`difference`: each side resampled independently, over its seeds, or over its examples for a single run).
Where both ran the same seeds, `paired_difference` resamples the per-seed differences instead: a seed that is
lucky or unlucky for every configuration (the same data order) no longer widens the interval.

With few seeds the bootstrap is coarse: for 3 seeds every resample is one of 27 equally likely triples, and
the 2.5% / 97.5% quantiles of their means are the smallest and largest seed (each has probability 1/27 = 3.7%):
the interval over 3 seeds is [min, max]. Resampling is seeded, so a report is the same every time.
"""
import dataclasses
from typing import Optional, Sequence

import numpy as np

LEVEL = 0.95
RESAMPLES = 20_000


@dataclasses.dataclass(frozen=True)
class Summary:
    """n values: their mean, sample standard deviation (ddof 1; 0 for one value) and a `level` interval."""
    n: int
    mean: float
    std: float
    lo: float
    hi: float
    over: str  # 'seeds', 'examples' or 'none' (one value and no example count: no interval)
    examples_lo: Optional[float] = None  # the interval over the held-out examples alone (None: no example count)
    examples_hi: Optional[float] = None


def _quantiles(samples, level):
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(samples, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _check_level(level):
    if not 0.0 < level < 1.0:
        raise ValueError(f'interval level {level} must be between 0 and 1 (e.g. 0.95).')


def bootstrap_means(values: Sequence[float], resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """[resamples] means of `values` resampled with replacement (the bootstrap distribution of the mean)."""
    x = np.asarray(values, np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f'bootstrap needs a non-empty list of numbers, got shape {x.shape}.')
    idx = np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))  # [resamples, n]
    return x[idx].mean(axis=1)


def proportion_means(p: float, n: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """[resamples] shares of `n` examples resampled from a set with share `p` right: Binomial(n, p) / n, which
    is exactly the bootstrap over the n 0/1 outcomes (their order does not matter)."""
    if not 0.0 <= p <= 1.0 or n < 1:
        raise ValueError(f'a proportion needs 0 <= p <= 1 and n >= 1 examples, got p={p}, n={n}.')
    return np.random.default_rng(seed).binomial(int(n), p, size=resamples) / n


def mean_interval(values: Sequence[float], level: float = LEVEL, resamples: int = RESAMPLES,
                  seed: int = 0) -> tuple:
    """The percentile bootstrap interval of the mean of `values` (e.g. one configuration's seeds)."""
    _check_level(level)
    return _quantiles(bootstrap_means(values, resamples, seed), level)


def proportion_interval(p: float, n: int, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0) -> tuple:
    """The percentile bootstrap interval over examples of a share `p` of `n` examples (one run's accuracy)."""
    _check_level(level)
    return _quantiles(proportion_means(p, n, resamples, seed), level)


def examples_interval(shares: Sequence[float], n: int, level: float = LEVEL, resamples: int = RESAMPLES,
                      seed: int = 0) -> tuple:
    """The interval of the mean of several runs' shares (each of the same `n` held-out examples) from resampling
    each run's examples alone, the seeds held fixed: how much of the spread the finite test set explains."""
    _check_level(level)
    draws = [proportion_means(p, n, resamples, seed + i) for i, p in enumerate(shares)]
    return _quantiles(np.mean(draws, axis=0), level)


def _resampled(values, examples, resamples, seed):
    """The bootstrap distribution of one group's mean: over its seeds, or (one run with an example count) over
    its examples; None when there is neither (one value, no count)."""
    if len(values) > 1:
        return bootstrap_means(values, resamples, seed), 'seeds'
    if examples and 0.0 <= values[0] <= 1.0:
        return proportion_means(values[0], int(examples), resamples, seed), 'examples'
    return None, 'none'


def summarize(values: Sequence[float], examples: Optional[int] = None, level: float = LEVEL,
              resamples: int = RESAMPLES, seed: int = 0) -> Summary:
    """A group's `Summary`: over seeds when it has several values, else over `examples` (the held-out set's size,
    for a share of examples right), else no interval (lo = hi = the value); with `examples`, also the interval
    over the examples alone (`examples_interval`)."""
    _check_level(level)
    x = np.asarray(values, np.float64)
    if x.size == 0:
        raise ValueError('summarize needs at least one value.')
    dist, over = _resampled(list(x), examples, resamples, seed)
    lo, hi = _quantiles(dist, level) if dist is not None else (float(x[0]), float(x[0]))
    std = float(x.std(ddof=1)) if x.size > 1 else 0.0
    ex = (examples_interval(list(x), int(examples), level, resamples, seed)
          if examples and np.all((x >= 0.0) & (x <= 1.0)) else (None, None))
    return Summary(int(x.size), float(x.mean()), std, lo, hi, over, *ex)


def difference(values: Sequence[float], baseline: Sequence[float], examples: Optional[int] = None,
               baseline_examples: Optional[int] = None, level: float = LEVEL, resamples: int = RESAMPLES,
               seed: int = 0) -> Optional[tuple]:
    """(mean(values) - mean(baseline), lo, hi): the bootstrap interval of the difference of the two means, each
    side resampled independently (seeds, or examples for a single run). None when either side has no
    interval (one run without an example count): nothing can be said."""
    _check_level(level)
    a, over_a = _resampled(list(map(float, values)), examples, resamples, seed)
    b, over_b = _resampled(list(map(float, baseline)), baseline_examples, resamples, seed + 1)
    if a is None or b is None:
        return None
    lo, hi = _quantiles(a - b, level)
    return float(np.mean(values) - np.mean(baseline)), lo, hi


def paired_difference(values: Sequence[float], baseline: Sequence[float], level: float = LEVEL,
                      resamples: int = RESAMPLES, seed: int = 0) -> tuple:
    """(mean of values[i] - baseline[i], lo, hi): the bootstrap interval of the mean difference over pairs of runs
    that share their seed (the same data order and initialisation of the new parts), so that what the seed does
    to both sides cancels. With 3 pairs the interval is [smallest, largest] difference (see above)."""
    a, b = np.asarray(values, np.float64), np.asarray(baseline, np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise ValueError(f'a paired difference needs two equally long lists of 2 or more values, got {a.shape} '
                         f'and {b.shape}.')
    diff = a - b
    return (float(diff.mean()), *mean_interval(diff, level, resamples, seed))


def differs(diff: Optional[tuple]) -> Optional[bool]:
    """Whether a `difference` interval excludes 0 (None when there is no interval)."""
    if diff is None:
        return None
    _, lo, hi = diff
    return lo > 0.0 or hi < 0.0
