"""Where metrics go: `workdir/metrics.jsonl` (read back by `ftjax.workdir.RunDir.metrics`), TensorBoard event
files, and the console's progress display (`Progress`).

Only process 0 writes; every process may call these functions. The workdir may be a bucket
(gs://..., via etils.epath): objects there cannot be appended to, so the file is rewritten whole.

`Progress` is a tqdm bar when stderr is a terminal; otherwise (CI logs, `| tee`, a file) it prints a plain
line to stdout every `every` units, e.g.

  ftjax: train step 20/40 (50%): loss 0.2720, 211 tok/s | 1:02 elapsed, ETA 1:01
"""
import contextlib
import json
import logging
import math
import os
import sys
import time

import jax
import numpy as np
from tqdm import tqdm

from ftjax.workdir import RunDir


def _scalar(v):
    v = np.asarray(v)
    return v.item() if v.size == 1 else v.tolist()


class MetricsLog:
    """Appends one JSON object per logged step and mirrors scalars to TensorBoard."""

    def __init__(self, workdir, total_steps, start_step=0, progress=True, log_every=1):
        self.primary = jax.process_index() == 0
        self.path = RunDir(workdir).metrics_file
        self.remote = is_remote(workdir)
        self.rows = []  # a remote file's lines, rewritten whole on each write
        self.tb = None
        self.bar = None  # the training's Progress, made at the first `progress` call
        self.bar_args = dict(desc='train step', total=total_steps, initial=start_step, every=log_every,
                             announce=True)
        self.show_progress = progress
        if not self.primary:
            return
        if start_step > 0:
            self._truncate_after(start_step)
        if self.remote and self.path.exists():
            self.rows = self.path.read_text().splitlines(keepends=True)
        try:
            from tensorboardX import SummaryWriter
            if str(workdir).startswith('gs://'):
                import google.cloud.storage  # noqa: F401  (tensorboardX writes gs:// with it)
            self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
        except ImportError as e:  # TensorBoard is optional
            if self.remote:
                logging.warning('No TensorBoard events in %s (%s); metrics.jsonl is still written.', workdir, e)
            self.tb = None

    def _truncate_after(self, step):
        """A resumed run rewrites the steps after its checkpoint, so each step appears once."""
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        keep = [line for line in lines if line.strip() and json.loads(line).get('step', 0) <= step]
        self.path.write_text(''.join(keep))

    def write(self, step, metrics):
        if not self.primary:
            return
        row = {'step': int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        line = json.dumps(row, allow_nan=True) + '\n'
        if self.remote:
            self.rows.append(line)
            self.path.write_text(''.join(self.rows))
        else:
            with open(self.path, 'a') as f:
                f.write(line)
        if self.tb is not None:
            for k, v in row.items():
                if k != 'step' and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def text(self, step, tag, text):
        if self.primary and self.tb is not None:
            self.tb.add_text(tag, text, step)

    def progress(self, step, loss=None, tokens_per_s=None):
        """The training's progress: step, loss (4 significant digits), tokens/s and ETA on the console.
        Call it once with the start step before the first step: the ETA then counts from there."""
        if not (self.primary and self.show_progress):
            return
        if self.bar is None:
            self.bar = Progress(**self.bar_args)
        info = {}
        if loss is not None:
            info['loss'] = significant(loss)
        if tokens_per_s:
            info['tok/s'] = f'{tokens_per_s:,.0f}'
        self.bar.update(step, **info)

    def note(self, text):
        """A line on the console (above the progress bar, if one is shown)."""
        if self.primary:
            if self.bar is not None:
                self.bar.write(text)
            else:
                print(text, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def is_remote(path):
    """A bucket path (gs://, s3://, ...) rather than a local one."""
    return '://' in str(path)


class Throughput:
    """Tokens/s over the steps since the last call (wall clock, after the first compiled step)."""

    def __init__(self):
        self.t = time.perf_counter()
        self.tokens = 0

    def add(self, tokens):
        self.tokens += tokens

    @contextlib.contextmanager
    def paused(self):
        """The time inside (an eval) does not count."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.t += time.perf_counter() - t

    def rate(self):
        now = time.perf_counter()
        r = self.tokens / max(now - self.t, 1e-9)
        self.t, self.tokens = now, 0
        return r


# --- the console's progress display ------------------------------------------------------------------------


def significant(x, digits=4):
    """`x` with `digits` significant digits: 0.2720186 -> '0.2720', 12.3456 -> '12.35', 1234567 -> '1.235e+06';
    an int (a count, e.g. eval/examples) as it is."""
    if isinstance(x, int) and not isinstance(x, bool):
        return str(x)
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return '0'
    exponent = math.floor(math.log10(abs(x)))
    if -4 <= exponent < digits:
        return f'{x:.{max(digits - 1 - exponent, 0)}f}'
    return f'{x:.{digits - 1}e}'


def duration(seconds):
    """Seconds as m:ss or h:mm:ss."""
    seconds = int(round(max(seconds, 0)))
    h, rest = divmod(seconds, 3600)
    return f'{h}:{rest // 60:02d}:{rest % 60:02d}' if h else f'{rest // 60}:{rest % 60:02d}'


def console_is_terminal():
    return sys.stderr.isatty()


class Progress:
    """Progress of a long loop (train steps, prompts answered, eval batches) on process 0's console.

    A tqdm bar on stderr when stderr is a terminal; otherwise a plain line on stdout every `every` units and
    at the end, so CI logs and `| tee` show progress; with `min_interval_s`, lines come at most that often
    (and the last one only after an earlier one). The ETA counts from the first update on (the first step
    includes compiling), or from the start while there is only one update. `announce`: a plain line at the
    start too.
    """

    def __init__(self, desc, total, initial=0, unit='', every=1, min_interval_s=0.0, leave=True, announce=False,
                 tty=None):
        self.desc, self.total, self.unit = desc, int(total), unit
        self.every, self.min_interval_s = every, min_interval_s
        self.enabled = jax.process_index() == 0
        self.n = self.last_n = self.start_n = int(initial)
        self.t_start = self.last_t = time.perf_counter()
        self.first = None  # (time, n) of the first update
        self.printed = False
        self.bar = None
        if self.enabled and (console_is_terminal() if tty is None else tty):
            self.bar = tqdm(total=self.total, initial=self.n, desc=f'ftjax: {desc}', unit=unit or desc.split()[-1],
                            dynamic_ncols=True, leave=leave)
        elif self.enabled and announce:  # the first line says that the loop started
            print(self.line(self.t_start), flush=True)

    def update(self, n, **info):
        """Now at `n` of `total`; `info` ({'loss': '0.2720', ...}, already formatted) is shown beside it."""
        if not self.enabled:
            return
        now, self.n = time.perf_counter(), int(n)
        if self.first is None and self.n > self.start_n:
            self.first = (now, self.n)
        if self.bar is not None:
            self.bar.n = self.n
            self.bar.set_postfix(info, refresh=False)
            self.bar.refresh()
            return
        end = self.n >= self.total
        due = end or self.n - self.last_n >= self.every
        if self.n > self.last_n and due and (now - self.last_t >= self.min_interval_s or (end and self.printed)):
            self.last_n, self.last_t, self.printed = self.n, now, True
            print(self.line(now, info), flush=True)

    def eta(self, now):
        """Seconds left (None before the first unit is done)."""
        t0, n0 = self.first if self.first and self.n > self.first[1] else (self.t_start, self.start_n)
        if self.n <= n0:
            return None
        return (self.total - self.n) * (now - t0) / (self.n - n0)

    def line(self, now, info=None):
        unit = f' {self.unit}' if self.unit else ''
        text = f'ftjax: {self.desc} {self.n}/{self.total}{unit} ({100 * self.n / max(self.total, 1):.0f}%)'
        if info:
            text += ': ' + ', '.join(f'{k} {v}' if k != 'tok/s' else f'{v} tok/s' for k, v in info.items())
        text += f' | {duration(now - self.t_start)} elapsed'
        eta = self.eta(now)
        if eta is not None and self.n < self.total:
            text += f', ETA {duration(eta)}'
        return text

    def write(self, text):
        """A line on the console that does not break the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
