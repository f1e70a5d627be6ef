"""Where metrics go: `workdir/metrics.jsonl` (read back by `ftjax.workdir.read_metrics`), TensorBoard event
files, and a progress bar.

Only process 0 writes; every process may call these functions. The workdir may be a bucket
(gs://..., via etils.epath): objects there cannot be appended to, so the file is rewritten whole.
"""
import json
import logging
import math
import os
import time

import jax
import numpy as np
from etils import epath

from ftjax.workdir import METRICS_FILE


def _scalar(v):
    v = np.asarray(v)
    return v.item() if v.size == 1 else v.tolist()


class MetricsLog:
    """Appends one JSON object per logged step and mirrors scalars to TensorBoard."""

    def __init__(self, workdir, total_steps, start_step=0, progress=True):
        self.primary = jax.process_index() == 0
        self.path = epath.Path(workdir) / METRICS_FILE
        self.remote = is_remote(workdir)
        self.rows = []  # a remote file's lines, rewritten whole on each write
        self.tb = None
        self.bar = None
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
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc='train', unit='step', dynamic_ncols=True,
                            disable=None)

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
        if self.bar is None:
            return
        self.bar.n = int(step)
        post = {}
        if loss is not None:
            post['loss'] = f'{loss:.4f}'
        if tokens_per_s:
            post['tok/s'] = f'{tokens_per_s:,.0f}'
        self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()

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

    def rate(self):
        now = time.perf_counter()
        r = self.tokens / max(now - self.t, 1e-9)
        self.t, self.tokens = now, 0
        return r
