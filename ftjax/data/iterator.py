"""The deterministic, resumable batch iterator, and host batches -> global `jax.Array`s.

Batches depend only on (seed, step). The rows of all epochs form one stream: epoch e is a
permutation of the N rows drawn from `np.random.default_rng([seed, e])` (or 0..N-1 unshuffled),
and global batch k is stream positions k*B .. k*B + B - 1. A batch that reaches past the end of an
epoch takes its remaining rows from the start of the next one (nothing is dropped, and N < B works),
so every row is seen once per epoch. With `pad_to_multiple_of` > 0 a batch's token dimension is the smallest
multiple of it that holds the longest row of the global batch (data.max_length at most), so every process
builds the same shape. The state is a few ints ({'step', ...}); restoring it gives
exactly the batches an uninterrupted run would have seen.

Multi-host: process p of P takes rows [p*B/P, (p+1)*B/P) of every global batch and materialises
only those; `to_global` joins the processes' rows into arrays sharded over the mesh's data axes.
"""
import logging

import jax
import numpy as np

from ftjax.data.packing import batch_length, row_lengths, take_rows


def process_slice(batch_size, process_index=0, process_count=1):
    """The contiguous slice of a global batch's rows that one process owns."""
    if batch_size % process_count:
        raise ValueError(f'the global batch size {batch_size} is not divisible by the {process_count} processes.')
    per = batch_size // process_count
    return slice(process_index * per, (process_index + 1) * per)


class DataIterator:
    """`next(it)` -> this process's rows of the next global batch, a dict of numpy arrays."""

    def __init__(self, data, batch_size, seed, shuffle=True, process_index=0, process_count=1, state=None,
                 pad_to_multiple_of=0):
        if len(data) == 0:
            raise ValueError('the data set has no rows.')
        if batch_size <= 0:
            raise ValueError(f'batch_size must be positive, got {batch_size}.')
        self.data, self.batch_size, self.seed, self.shuffle = data, int(batch_size), int(seed), bool(shuffle)
        self.local = process_slice(self.batch_size, process_index, process_count)
        self.multiple = int(pad_to_multiple_of)
        self._lengths = row_lengths(data) if self.multiple > 0 else None  # [num_rows]
        self.step = 0
        self._perms = {}
        if state is not None:
            self.restore(state)

    @property
    def num_rows(self):
        return len(self.data)

    def permutation(self, epoch):
        """Row order of `epoch` [num_rows]."""
        if not self.shuffle:
            return np.arange(self.num_rows)
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
        return self._perms[epoch]

    def indices(self, step):
        """Row indices of global batch `step` [batch_size] (all processes)."""
        pos = step * self.batch_size + np.arange(self.batch_size, dtype=np.int64)  # positions in the stream
        epochs, within = pos // self.num_rows, pos % self.num_rows
        out = np.empty(self.batch_size, np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.permutation(int(e))[within[sel]]
        return out

    def batch(self, step):
        """This process's rows of global batch `step`, without moving the iterator."""
        rows = self.indices(step)  # [batch_size], all processes'
        length = None if self._lengths is None else batch_length(self._lengths[rows], self.data.max_length,
                                                                  self.multiple)
        return take_rows(self.data, rows[self.local], length=length)

    def __iter__(self):
        return self

    def __next__(self):
        out = self.batch(self.step)
        self.step += 1
        return out

    @property
    def epoch(self):
        """The epoch the next batch starts in."""
        return self.step * self.batch_size // self.num_rows

    @property
    def state(self):
        """Ints for the checkpoint; only 'step' drives the order, the rest is checked on restore."""
        return {'step': self.step, 'epoch': self.epoch, 'seed': self.seed, 'num_rows': self.num_rows,
                'batch_size': self.batch_size, 'shuffle': int(self.shuffle)}

    def restore(self, state):
        """Continues from a saved `state` (a dict from `.state`, or {'step': k})."""
        for key, mine in (('seed', self.seed), ('num_rows', self.num_rows), ('batch_size', self.batch_size),
                          ('shuffle', int(self.shuffle))):
            if key in state and int(state[key]) != mine:
                logging.warning('data iterator: the checkpoint was written with %s=%s, this run has %s; resumed '
                                'batches will differ from the interrupted run.', key, state[key], mine)
        self.step = int(state['step'])
        return self


def make_iterator(data, batch_size, seed, shuffle=True, process_index=0, process_count=1, state=None,
                  pad_to_multiple_of=0):
    """The batch iterator of `data` (a TokenizedData); `batch_size` is the global batch (all processes)."""
    return DataIterator(data, batch_size, seed, shuffle, process_index, process_count, state, pad_to_multiple_of)


def to_global(batch, sharding):
    """This process's rows {name: np.ndarray [local_batch, ...]} -> global jax.Arrays [global_batch, ...].

    `sharding` splits the leading axis over the mesh's data axes, e.g.
    NamedSharding(mesh, PartitionSpec(('data', 'fsdp'))).
    """
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
