"""Truncation, text chunking, packing, and turning rows into padded batch arrays.

Examples are kept ragged (tokens back to back, `offsets` between them); a row is a list of
examples; `take_rows` materialises only the rows asked for. An LM example of n + 1 tokens
x_0..x_n takes n positions of a row: input x_0..x_{n-1}, target x_1..x_n, loss mask = the answer
mask of x_1..x_n, positions 0..n-1, and its own segment id (1, 2, ... within the row; 0 = padding).
So a row of `max_length` positions holds examples of up to max_length + 1 tokens, and neither
attention (segment mask) nor loss crosses examples.

Packing is best-fit decreasing: longest example first, into the fullest row it still fits.
"""
import bisect

import numpy as np

from ftjax.data import layout


def ragged_gather(arrays, starts, ends):
    """Slices [starts[i], ends[i]) of each flat array, back to back -> (gathered arrays, offsets [n + 1])."""
    lengths = np.asarray(ends, np.int64) - np.asarray(starts, np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    idx = np.repeat(np.asarray(starts, np.int64) - offsets[:-1], lengths) + np.arange(offsets[-1])
    return [a[idx] for a in arrays], offsets


def truncate_windows(starts, ends, limit, policy):
    """Windows of at most `limit` tokens: right keeps the first, left the last, drop marks the rest.

    Returns (starts, ends, keep [n] bool, number truncated).
    """
    starts, ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
    long = ends - starts > limit
    keep = np.ones(len(starts), bool)
    if policy == 'right':
        ends = np.where(long, starts + limit, ends)
    elif policy == 'left':
        starts = np.where(long, ends - limit, starts)
    elif policy == 'drop':
        keep = ~long
    else:
        raise ValueError(f"data.truncation={policy!r} is not one of 'right', 'left', 'drop'.")
    return starts, ends, keep, int(long.sum()) if policy != 'drop' else 0


def chunk_windows(num_tokens, max_length, stride):
    """Windows of max_length + 1 tokens every `stride` tokens over a token stream, covering all of it.

    Returns (starts, ends, overlap [n]): the first `overlap` targets of a window were already the
    targets of the window before, so they are not learned again.
    """
    width = max_length + 1
    if num_tokens < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    n = 1 if num_tokens <= width else 1 + -(-(num_tokens - width) // stride)
    starts = np.arange(n, dtype=np.int64) * stride
    ends = np.minimum(starts + width, num_tokens)
    overlap = np.where(np.arange(n) > 0, np.minimum(max_length - stride, ends - starts - 1), 0)
    return starts, ends, overlap


def pack_rows(lengths, capacity, packing=True):
    """Assigns examples (`lengths` positions each) to rows -> (row_offsets [rows + 1], row_examples [n])."""
    lengths = np.asarray(lengths, np.int64)
    if not packing or not len(lengths):
        return np.arange(len(lengths) + 1, dtype=np.int64), np.arange(len(lengths), dtype=np.int64)
    spaces = []  # sorted distinct free spaces of open rows
    open_rows = {}  # free space -> [row ids]
    rows = []
    for e in np.argsort(-lengths, kind='stable'):
        n = int(lengths[e])
        k = bisect.bisect_left(spaces, n)
        if k == len(spaces):  # fits in no open row: a new row
            r, free = len(rows), capacity - n
            rows.append([int(e)])
        else:  # the open row with the least free space that still fits
            space = spaces[k]
            r = open_rows[space].pop()
            if not open_rows[space]:
                del open_rows[space]
                spaces.pop(k)
            rows[r].append(int(e))
            free = space - n
        if free > 0:
            if free not in open_rows:
                open_rows[free] = []
                bisect.insort(spaces, free)
            open_rows[free].append(r)
    row_offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    return row_offsets, np.array([e for r in rows for e in r], np.int64)


def row_lengths(data):
    """Non-padding positions of each row [num_rows]."""
    per_example = np.diff(data.offsets) - (0 if data.task == 'classification' else 1)
    sums = np.concatenate([[0], np.cumsum(per_example[data.row_examples])])
    return sums[data.row_offsets[1:]] - sums[data.row_offsets[:-1]]


def batch_length(lengths, max_length, multiple=0):
    """The token dimension of a batch whose rows have `lengths` non-padding positions: `max_length`, or with
    `multiple` > 0 the smallest multiple of it that holds the longest row, at most `max_length`
    (data.pad_to_multiple_of: short batches cost less, and each distinct length compiles once)."""
    if multiple <= 0:
        return int(max_length)
    longest = int(np.max(lengths, initial=1))  # at least 1: an all-padding batch still has one position
    return int(min(max_length, -(-longest // multiple) * multiple))


def efficiency(data):
    """Fraction of non-padding positions over all rows x max_length."""
    return float(row_lengths(data).sum() / max(len(data) * data.max_length, 1))


def take_rows(data, rows, valid=None, length=None):
    """The batch arrays of `rows` (indices into the data's rows), laid out as `ftjax.data.layout` says for
    `data.task`: [len(rows), length] (`length`: data.max_length unless given; at least the rows' longest;
    classification's label [len(rows)]). Preference rows are LM rows of
    two segments (1: chosen, 2: rejected), plus 'ref_logps' [len(rows), 2] once
    `ftjax.objectives.reference.attach_reference` has set `data.ref_logps`. With `valid` [len(rows)] bool (padding rows
    of a short last eval batch), adds 'valid' and zeroes the loss mask of invalid rows.
    """
    rows = np.asarray(rows, np.int64)
    reference = getattr(data, 'ref_logps', None) is not None
    length = data.max_length if length is None else int(length)
    out = layout.empty(data.task, len(rows), length, data.pad_id, reference=reference,
                       valid=valid is not None)
    if data.task == 'classification':
        out['label'] = data.labels[data.row_examples[data.row_offsets[rows]]].astype(np.int32)
        for i, r in enumerate(rows):
            e = data.row_examples[data.row_offsets[r]]
            s, end = data.offsets[e], data.offsets[e + 1]
            n = end - s
            out['input_ids'][i, :n] = data.tokens[s:end]
            out['attention_mask'][i, :n] = 1
            out['token_type_ids'][i, :n] = data.token_types[s:end]
    else:
        for i, r in enumerate(rows):
            pos = 0
            for seg, e in enumerate(data.row_examples[data.row_offsets[r]:data.row_offsets[r + 1]], start=1):
                s, end = data.offsets[e], data.offsets[e + 1]
                n = end - s - 1
                out['input_ids'][i, pos:pos + n] = data.tokens[s:end - 1]
                out['target_ids'][i, pos:pos + n] = data.tokens[s + 1:end]
                out['loss_mask'][i, pos:pos + n] = data.answer[s + 1:end]
                out['segment_ids'][i, pos:pos + n] = seg
                out['positions'][i, pos:pos + n] = np.arange(n)
                pos += n
    if reference:
        out['ref_logps'][:] = data.ref_logps[rows]  # [batch, 2]
    if valid is not None:
        out['valid'][:] = valid  # [batch]
        if 'loss_mask' in out:
            out['loss_mask'] *= out['valid'][:, None]
    return out
