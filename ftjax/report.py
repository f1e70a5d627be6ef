"""Results of finished runs and sweeps: one row per run, as CSV, a markdown table and loss curves.

  python -m ftjax report --workdir=DIR      # DIR: one run's workdir, or a sweep's (run dirs inside)

A run's workdir holds `config.json` (the resolved config), `metrics.jsonl` (one object per logged
step), once it ended cleanly `summary.json`, and after an lm-evaluation-harness run (`eval.harness_tasks`,
or `python -m ftjax evaluate --workdir`) `harness.json`, whose task metrics become 'final harness/TASK/METRIC'
columns. A sweep's workdir holds one such directory per grid point and `sweep.json` (the grid), whose keys
become the table's first columns; without it, the columns are the config keys whose values differ between
the runs.
"""
import csv
import json
import math
import os

from ftjax.errors import MissingFileError, WorkdirError
from ftjax.workdir import CONFIG_FILE, HARNESS_FILE, METRICS_FILE, SUMMARY_FILE, RunDir

RUN_FILES = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE)
SWEEP_FILE = 'sweep.json'
ERROR_FILE = 'sweep_error.txt'  # written by a sweep (ftjax.sweep) when a run raised or its process failed
LOWER_IS_BETTER = ('loss', 'perplexity', 'error')


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
            if not (k.startswith('eval/') or k.startswith('gen/')) or not _is_number(v):
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


def write_all(workdir):
    """results.csv, results.md and loss_curves.png in `workdir`; returns the rows."""
    rows = collect(workdir)
    write_table(rows, workdir)
    plot_loss_curves(rows, os.path.join(workdir, 'loss_curves.png'))
    return rows
