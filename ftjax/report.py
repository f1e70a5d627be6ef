"""Results of finished runs and sweeps: one row per run, as CSV, a markdown table and loss curves.

  python -m ftjax report --workdir=DIR      # DIR: one run's workdir, or a sweep's (run dirs inside)

A run's workdir holds `config.json` (the resolved config), `metrics.jsonl` (one object per logged
step), once it ended cleanly `summary.json`, and after an lm-evaluation-harness run (`eval.harness_tasks`,
or `python -m ftjax evaluate --workdir`) `harness.json`, whose task metrics become 'final harness/TASK/METRIC'
columns. A sweep's workdir holds one such directory per grid point and `sweep.json` (the grid), whose keys
become the table's first columns; without it, the columns are the config keys whose values differ between
the runs.

Runs of one configuration with different seeds (`ftjax sweep --seeds=N`, or a `train.seed` grid) are grouped
(`grouped`): per configuration the seed count, mean, standard deviation and a 95% bootstrap interval of one
metric (over seeds; over the held-out examples for a single run; `ftjax.stats`), and, given a baseline
(`--baseline=KEY=VALUE`: each row against the row that has VALUE for KEY and the same other values), the
difference of the means with its interval, marked where the interval excludes 0. Written as
results_by_config.csv / .md, with seed_curves.png (mean curves over the seeds, min-max bands).
"""
import csv
import json
import math
import os

from ftjax import stats
from ftjax.errors import ConfigError, MissingFileError, WorkdirError
from ftjax.workdir import CONFIG_FILE, HARNESS_FILE, METRICS_FILE, SUMMARY_FILE, RunDir

RUN_FILES = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE)
SWEEP_FILE = 'sweep.json'
ERROR_FILE = 'sweep_error.txt'  # written by a sweep (ftjax.sweep) when a run raised or its process failed
LOWER_IS_BETTER = ('loss', 'perplexity', 'error')
SEED_KEY = 'train.seed'
# the metric a grouped table shows when none is named: the first of these a finished run has
METRICS = ('final eval/accuracy', 'final gen/exact_match', 'final eval/reward', 'final eval/rewards/accuracy',
           'final eval/loss')
ROW_FIELDS = ('run', 'path', 'status', 'step', 'train loss')


def _read_json(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise WorkdirError(f'{path} is not valid JSON ({e}); delete it if the run was interrupted while '
                               f'writing it.') from e


def is_run_dir(path):
    return any(os.path.exists(os.path.join(path, name)) for name in RUN_FILES)


def finished(run_dir, steps=None):
    """True when `summary.json` says the run ended cleanly at `steps` (default: its config's train.steps)."""
    summary = _read_json(os.path.join(run_dir, SUMMARY_FILE))
    if not summary or summary.get('exit_code', 1) != 0:
        return False
    if steps is None and RunDir(run_dir).config_file.exists():
        steps = RunDir(run_dir).config().train.steps  # laid over today's defaults
    return steps is not None and summary.get('step') == steps


def flatten(tree, prefix=''):
    """{'optim': {'learning_rate': 1e-4}} -> {'optim.learning_rate': 1e-4}."""
    out = {}
    for k, v in tree.items():
        key = f'{prefix}{k}'
        if isinstance(v, dict):
            out.update(flatten(v, key + '.'))
        else:
            out[key] = v
    return out


def lower_is_better(metric):
    return any(word in metric for word in LOWER_IS_BETTER)


def best_metrics(metrics):
    """{'best eval/loss': min, 'best eval/accuracy': max, ...} over every logged eval/gen value."""
    best = {}
    for row in metrics:
        for k, v in row.items():
            if not (k.startswith('eval/') or k.startswith('gen/')) or not _is_number(v) or k.endswith('/examples'):
                continue
            prev = best.get(k)
            if prev is None or (v < prev if lower_is_better(k) else v > prev):
                best[k] = v
    return {f'best {k}': v for k, v in sorted(best.items())}


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def run_row(run_dir, varied=(), planned=None):
    """One run's row: its varied config values, status, final and best eval metrics, size and speed.

    `planned`: the sweep's values for this run, shown before its config.json exists."""
    config = dict(planned or {}, **flatten(_read_json(os.path.join(run_dir, 'config.json')) or {}))
    summary = _read_json(os.path.join(run_dir, 'summary.json')) or {}
    metrics = RunDir(run_dir).metrics()
    row = {'run': os.path.basename(os.path.normpath(run_dir)), 'path': run_dir}
    row.update({k: config.get(k) for k in varied})
    if finished(run_dir):
        status = 'finished'
    elif os.path.exists(os.path.join(run_dir, ERROR_FILE)):
        status = 'failed'
    elif not is_run_dir(run_dir):
        status = 'pending'
    else:
        status = 'incomplete'
    last = {}
    for m in metrics:  # the latest logged value of every metric
        last.update({k: v for k, v in m.items() if v is not None})
    row['status'] = status
    row['step'] = summary.get('step', last.get('step'))
    row['train loss'] = summary.get('loss', last.get('loss'))
    evals = sorted({k for k in list(summary) + list(last) if k.startswith('eval/') or k.startswith('gen/')})
    for k in evals:
        row[f'final {k}'] = summary.get(k, last.get(k))
    harness = (_read_json(os.path.join(run_dir, HARNESS_FILE)) or {}).get('summary', {})
    row.update({f'final harness/{k}': v for k, v in harness.items()})  # the latest harness evaluation
    row.update(best_metrics(metrics))
    row['trainable params'] = summary.get('trainable_params')
    row['tokens/s'] = summary.get('tokens_per_s', last.get('tokens_per_s'))
    row['wall s'] = summary.get('wall_s')
    return row


def _varied_keys(run_dirs):
    """Config keys whose values differ between the runs (none for a single run)."""
    configs = [flatten(_read_json(os.path.join(d, 'config.json')) or {}) for d in run_dirs]
    keys = sorted(set().union(*configs)) if configs else []
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]


def collect(workdir):
    """Rows for `workdir`: one run's workdir, or a sweep workdir holding one directory per run."""
    if not os.path.isdir(workdir):
        raise MissingFileError(f'{workdir} does not exist or is not a directory; pass --workdir=DIR of a run or '
                               f'a sweep.')
    if is_run_dir(workdir):
        return [run_row(workdir)]
    sweep = _read_json(os.path.join(workdir, SWEEP_FILE))
    if sweep:  # the sweep's order and grid keys; runs not started yet show as pending
        varied = [key for key, _ in sweep['grid']]
        return [run_row(os.path.join(workdir, r['name']), varied, r['values']) for r in sweep['runs']]
    run_dirs = [os.path.join(workdir, n) for n in sorted(os.listdir(workdir))]
    run_dirs = [d for d in run_dirs if os.path.isdir(d) and is_run_dir(d)]
    varied = _varied_keys(run_dirs)
    if not run_dirs:
        raise MissingFileError(f'{workdir} holds no run: expected config.json/metrics.jsonl/summary.json in it or '
                               f'in its subdirectories (has a run started there yet?).')
    return [run_row(d, varied) for d in run_dirs]


def columns(rows):
    """Column order: run, varied values, status, step, train loss, final then best metrics, size, speed."""
    cols = []
    for row in rows:
        cols.extend(k for k in row if k not in cols)
    head = [c for c in cols if not (c.startswith('final ') or c.startswith('best '))
            and c not in ('trainable params', 'tokens/s', 'wall s')]
    finals = [c for c in cols if c.startswith('final ')]
    bests = [c for c in cols if c.startswith('best ')]
    return head + sorted(finals) + sorted(bests) + ['trainable params', 'tokens/s', 'wall s']


def _cell(key, value):
    if value is None:
        return ''
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and key in ('tokens/s', 'wall s'):
        return f'{value:,.0f}'
    if isinstance(value, int) and key == 'trainable params':
        return f'{value:,}'
    if isinstance(value, float):
        return f'{value:.4g}'
    if isinstance(value, (list, dict)):
        return json.dumps(value).replace('|', '\\|')
    return str(value).replace('|', '\\|')


def markdown_table(rows):
    cols = [c for c in columns(rows) if c != 'path']
    lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
    lines += ['| ' + ' | '.join(_cell(c, row.get(c)) for c in cols) + ' |' for row in rows]
    return '\n'.join(lines) + '\n'


def write_table(rows, out_dir):
    """Writes `out_dir/results.csv` (raw values) and `out_dir/results.md`; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    cols = columns(rows)
    csv_path, md_path = os.path.join(out_dir, 'results.csv'), os.path.join(out_dir, 'results.md')
    with open(csv_path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: json.dumps(row[c]) if isinstance(row.get(c), (list, dict)) else row.get(c)
                             for c in cols})
    with open(md_path, 'w') as f:
        f.write(markdown_table(rows))
    return csv_path, md_path


def plot_loss_curves(runs, path):
    """One train-loss curve per run (and eval loss beside it when logged), saved as a PNG at `path`."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    curves = []
    for run in runs:
        metrics = RunDir(run['path']).metrics()
        train = [(m['step'], m['loss']) for m in metrics if _is_number(m.get('loss'))]
        evals = [(m['step'], m['eval/loss']) for m in metrics if _is_number(m.get('eval/loss'))]
        curves.append((run['run'], train, evals))
    has_eval = any(e for _, _, e in curves)
    fig, axes = plt.subplots(1, 2 if has_eval else 1, figsize=(12 if has_eval else 7, 4.5), squeeze=False)
    for name, train, evals in curves:
        if train:
            axes[0, 0].plot(*zip(*train), label=name)
        if has_eval and evals:
            axes[0, 1].plot(*zip(*evals), marker='o', label=name)
    titles = ['train loss', 'eval loss'][:axes.shape[1]]
    for ax, title in zip(axes[0], titles):
        ax.set_title(title)
        ax.set_xlabel('step')
        ax.set_ylabel('loss')
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize='small')
        else:
            ax.text(0.5, 0.5, 'no values logged yet', ha='center', va='center', transform=ax.transAxes)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- seeds of one configuration: grouped, with intervals --------------------------------------------------

def config_keys(rows):
    """The table's config columns (the grid's keys, or the keys that differ between the runs)."""
    return [c for c in columns(rows) if c not in ROW_FIELDS and not c.startswith(('final ', 'best '))
            and c not in ('trainable params', 'tokens/s', 'wall s')]


def has_seeds(rows):
    """Whether some configuration of `rows` ran with more than one seed."""
    keys = [k for k in config_keys(rows) if k != SEED_KEY]
    labels = [json.dumps([r.get(k) for k in keys], sort_keys=True) for r in rows]
    return SEED_KEY in config_keys(rows) and len(set(labels)) < len(labels)


def default_metric(rows):
    for metric in METRICS:
        if any(_is_number(r.get(metric)) for r in rows if r['status'] == 'finished'):
            return metric
    raise ConfigError(f'no finished run has any of {", ".join(METRICS)}; name the metric, e.g. '
                      f'--metric="final eval/loss".')


def _parse_baseline(baseline, keys):
    key, sep, value = (baseline or '').partition('=')
    if not sep or key not in keys:
        raise ConfigError(f'--baseline={baseline}: expected KEY=VALUE with KEY one of the configuration keys '
                          f'{keys} (e.g. --baseline={keys[0] if keys else "arg"}=...).')
    return key, value


def _text(value):
    return value if isinstance(value, str) else json.dumps(value)


def grouped(rows, metric=None, baseline=None, level=stats.LEVEL, resamples=stats.RESAMPLES):
    """(metric, groups): the finished runs grouped by configuration (every config key but the seed); each
    group {'values', 'runs', 'summary' (`stats.Summary`), 'diff' (vs its baseline: (delta, lo, hi) or None),
    'differs', 'is_baseline'}. A single run's interval is over its examples (`eval/examples`,
    `gen/examples`) for a share-of-examples metric."""
    done = [r for r in rows if r['status'] == 'finished']
    metric = metric or default_metric(rows)
    if not any(metric in r for r in done):
        names = sorted({k for r in done for k in r if k.startswith(('final ', 'best '))})
        raise ConfigError(f'--metric={metric!r}: no finished run has it; the runs have {names}.')
    keys = [k for k in config_keys(rows) if k != SEED_KEY]
    counts = f"{metric.rsplit('/', 1)[0]}/examples"  # 'final eval/accuracy' -> 'final eval/examples'
    groups = {}
    for r in done:
        if _is_number(r.get(metric)):
            label = json.dumps([r.get(k) for k in keys], sort_keys=True)
            groups.setdefault(label, {'values': {k: r.get(k) for k in keys}, 'runs': []})['runs'].append(r)
    out = list(groups.values())
    for g in out:
        g['metric'] = [r[metric] for r in g['runs']]
        sizes = {r.get(counts) for r in g['runs']}
        g['examples'] = sizes.pop() if len(sizes) == 1 else None  # the held-out set's size, the same in every run
        g['summary'] = stats.summarize(g['metric'], g['examples'], level, resamples)
        g['diff'] = g['differs'] = g['paired'] = g['paired_differs'] = None
        g['is_baseline'] = False
    if baseline:
        key, value = _parse_baseline(baseline, keys)
        for g in out:
            g['is_baseline'] = _text(g['values'][key]) == value
        for g in out:
            base = [b for b in out if b['is_baseline'] and all(
                b['values'][k] == g['values'][k] for k in keys if k != key)]
            if base and not g['is_baseline']:
                b = base[0]
                g['diff'] = stats.difference(g['metric'], b['metric'], _single(g), _single(b), level, resamples)
                g['differs'] = stats.differs(g['diff'])
                g['paired'] = _paired(g, b, level, resamples)
                g['paired_differs'] = stats.differs(g['paired'])
    return metric, out


def _paired(group, base, level, resamples):
    """`stats.paired_difference` of `group` against `base` over the seeds both ran (2 or more, each once; the
    same data order and init on both sides), else None."""
    def by_seed(g):
        seeds = [r.get(SEED_KEY) for r in g['runs']]
        return dict(zip(seeds, g['metric'])) if None not in seeds and len(set(seeds)) == len(seeds) else {}
    mine, theirs = by_seed(group), by_seed(base)
    if len(mine) < 2 or set(mine) != set(theirs):
        return None
    seeds = sorted(mine)
    return stats.paired_difference([mine[k] for k in seeds], [theirs[k] for k in seeds], level, resamples)


def _single(group):
    """A group's example count when it is one run (its interval is over examples), else None (over seeds)."""
    return group['examples'] if len(group['runs']) == 1 else None


def _diff_cell(diff, differs):
    return '' if diff is None else f'{diff[0]:+.4f} [{diff[1]:+.4f}, {diff[2]:+.4f}]' + (' *' if differs else '')


def grouped_table(metric, groups, level=stats.LEVEL):
    """Markdown: one row per configuration, the seed count, mean, std and interval of `metric`, and the
    difference to the baseline row with its interval (marked * where it excludes 0); where a row ran the
    baseline's seeds, also the difference paired by seed."""
    keys = list(groups[0]['values']) if groups else []
    pct = f'{level:.0%}'
    paired = any(g['paired'] is not None for g in groups)
    head = keys + ['seeds', f'mean {metric}', 'std', f'{pct} interval', 'over', f'{pct} interval, examples only',
                   f'vs baseline ({pct} interval)'] + ([f'vs baseline, paired by seed ({pct} interval)'] * paired)
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for g in groups:
        s = g['summary']
        vs = 'baseline' if g['is_baseline'] else _diff_cell(g['diff'], g['differs'])
        vs_paired = ['baseline' if g['is_baseline'] else _diff_cell(g['paired'], g['paired_differs'])] * paired
        interval = f'[{s.lo:.4f}, {s.hi:.4f}]' if s.over != 'none' else ''
        examples = f'[{s.examples_lo:.4f}, {s.examples_hi:.4f}]' if s.examples_lo is not None else ''
        cells = [_cell(k, g['values'][k]) for k in keys] + [str(s.n), f'{s.mean:.4f}', f'{s.std:.4f}', interval,
                                                              s.over if s.over != 'none' else '', examples, vs,
                                                              *vs_paired]
        lines.append('| ' + ' | '.join(cells) + ' |')
    note = (f'\n{metric}: mean over seeds; {pct} percentile bootstrap interval of the mean (over seeds, or over '
            f'the held-out examples for a single run); examples only: each run\'s held-out examples resampled, the '
            f'seeds fixed (the test set\'s share of the noise); * = the interval of the difference to the baseline '
            f'excludes 0' + ('; paired by seed: the bootstrap over the per-seed differences (each run against '
                             'the baseline run of its seed: same data order and init)' * paired) + '.\n')
    return '\n'.join(lines) + '\n' + note


def write_grouped(metric, groups, out_dir, level=stats.LEVEL):
    """results_by_config.csv and .md, and seed_curves.png, in `out_dir`."""
    keys = list(groups[0]['values']) if groups else []
    with open(os.path.join(out_dir, 'results_by_config.csv'), 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(keys + ['metric', 'seeds', 'mean', 'std', 'lo', 'hi', 'over', 'examples_lo', 'examples_hi',
                                'level', 'diff', 'diff_lo', 'diff_hi', 'differs', 'paired_diff', 'paired_lo',
                                'paired_hi', 'paired_differs', 'runs'])
        for g in groups:
            s, d, pd = g['summary'], g['diff'] or (None, None, None), g['paired'] or (None, None, None)
            writer.writerow([_text(g['values'][k]) for k in keys] + [metric, s.n, s.mean, s.std, s.lo, s.hi, s.over,
                            s.examples_lo, s.examples_hi, level, *d, g['differs'], *pd, g['paired_differs'],
                            ' '.join(r['run'] for r in g['runs'])])
    with open(os.path.join(out_dir, 'results_by_config.md'), 'w') as f:
        f.write(grouped_table(metric, groups, level))
    plot_seed_curves(metric, groups, os.path.join(out_dir, 'seed_curves.png'))


def _curve(run_dirs, key):
    """(steps, mean, min, max) of `key` over the runs, at the steps every run logged."""
    per_run = [{m['step']: m[key] for m in RunDir(d).metrics() if _is_number(m.get(key))} for d in run_dirs]
    steps = sorted(set.intersection(*[set(c) for c in per_run])) if per_run else []
    values = [[c[s] for c in per_run] for s in steps]
    return steps, [sum(v) / len(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def plot_seed_curves(metric, groups, path):
    """Per configuration: the train loss and `metric`'s eval curve, mean over the seeds with a min-max band."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    logged = metric.removeprefix('final ').removeprefix('best ')
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), squeeze=False)
    for g in groups:
        label = ', '.join(_cell(k, v) for k, v in g['values'].items()) + f" (n={g['summary'].n})"
        for ax, key in zip(axes[0], ('loss', logged)):
            steps, mean, lo, hi = _curve([r['path'] for r in g['runs']], key)
            if steps:
                line, = ax.plot(steps, mean, marker='o' if key != 'loss' else None, label=label)
                ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2)
    for ax, title in zip(axes[0], ('train loss', logged)):
        ax.set_title(f'{title} (mean over seeds, min-max band)')
        ax.set_xlabel('step')
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize='small')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(workdir, metric=None, baseline=None):
    """results.csv, results.md and loss_curves.png in `workdir` (and, when a configuration ran with several
    seeds or a metric / baseline is named, results_by_config.* and seed_curves.png); returns (rows, grouped
    markdown or None)."""
    rows = collect(workdir)
    write_table(rows, workdir)
    plot_loss_curves(rows, os.path.join(workdir, 'loss_curves.png'))
    if not (has_seeds(rows) or metric or baseline) or not any(r['status'] == 'finished' for r in rows):
        return rows, None
    metric, groups = grouped(rows, metric, baseline)
    write_grouped(metric, groups, workdir)
    return rows, grouped_table(metric, groups)
