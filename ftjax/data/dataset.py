"""`build_dataset`: config + tokenizer -> TokenizedData (ragged examples, rows, stats).

Preference pairs (`data.format='preference'`, task 'preference'): each pair is two examples, chosen then
rejected, and each row holds exactly one pair (segment 1 chosen, segment 2 rejected), so the pair stays
together and attention within each sequence; a pair longer than a row is truncated evenly ('right' keeps
the first tokens of each sequence, 'left' the last) or dropped ('drop'); a pair whose truncated answers are
the same tokens (the difference was cut off) is dropped.

load (sources) -> tokenise with `datasets.map` (cached under a fingerprint of the raw data, the
format options, the tokenizer and its chat template, and the library versions; a second run reads
the cache) -> held-out selection -> bad rows (error | skip) -> truncate or chunk -> pack into rows.
Batches are made later, by `take_rows`.

A cached bad-row verdict is never trusted as a failure: the bad rows of the split (up to RECHECK of
them) are formatted again, and if any verdict changed (the environment was fixed since), the whole
split is tokenised afresh.
"""
import dataclasses
import functools
import logging
import time
from typing import Optional

import numpy as np

from ftjax.config import check_data_config
from ftjax.data import bad_rows, formats, packing, sources
from ftjax.data.check import check_columns
from ftjax.errors import DataError

RECHECK = 256  # bad rows formatted again before their cached verdict is used


@dataclasses.dataclass
class TokenizedData:
    """Examples back to back in flat arrays; rows list their examples. `len()` is the number of rows."""
    task: str  # 'lm' | 'classification' | 'preference'
    max_length: int  # positions per row
    pad_id: int
    tokens: np.ndarray  # int32 [num_tokens]
    offsets: np.ndarray  # int64 [num_examples + 1]: example i is tokens[offsets[i]:offsets[i + 1]]
    row_offsets: np.ndarray  # int64 [num_rows + 1]: row r holds row_examples[row_offsets[r]:row_offsets[r + 1]]
    row_examples: np.ndarray  # int64 [num_examples]
    answer: Optional[np.ndarray] = None  # int8 [num_tokens] (lm): 1 on answer tokens, unshifted
    token_types: Optional[np.ndarray] = None  # int8 [num_tokens] (classification)
    labels: Optional[np.ndarray] = None  # int32 [num_examples] (classification)
    ref_logps: Optional[np.ndarray] = None  # float32 [num_rows, 2] (preference): the reference's answer log-probs
    stats: dict = dataclasses.field(default_factory=dict)

    def __len__(self):
        return len(self.row_offsets) - 1

    @property
    def num_examples(self):
        return len(self.offsets) - 1


def tokenize(source, info, opts, num_proc=None, fresh=False):
    """datasets.map over all raw rows, with a deterministic fingerprint, so a second run hits the cache.

    fresh: ignore (and overwrite) a cached result.
    """
    ds = source.dataset
    fn = functools.partial(formats.tokenize_batch, info=info, opts=opts)
    return ds.map(fn, batched=True, batch_size=256, remove_columns=ds.column_names,
                  features=formats.output_features(opts), num_proc=num_proc, load_from_cache_file=not fresh,
                  new_fingerprint=formats.fingerprint(source.fingerprint, opts, info.tokenizer),
                  desc=f'ftjax: tokenising ({opts.format})')


def verdicts_hold(source, table, rows, info, opts):
    """Formats up to RECHECK bad rows among `rows` again: False when a verdict differs from the table's."""
    bad_field = table.column('bad_field').to_numpy(zero_copy_only=False)
    bad = rows[bad_field[rows] != ''][:RECHECK]
    if not len(bad):
        return True
    fresh = formats.tokenize_batch(source.dataset[bad.tolist()], info, opts)
    cached_reason = table.column('bad_reason').to_numpy(zero_copy_only=False)[bad]
    return list(fresh['bad_field']) == list(bad_field[bad]) and list(fresh['bad_reason']) == list(cached_reason)


def _ragged(table, name, dtype):
    """A list column of an Arrow table -> (flat values, offsets [rows + 1])."""
    import pyarrow.compute as pc
    col = table.column(name).combine_chunks()
    values = pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(dtype)
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64)
    return values, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def _language_model(table, rows, cfg, plan, fmt):
    tokens, offs = _ragged(table, 'input_ids', np.int32)
    answer, _ = _ragged(table, 'answer_mask', np.int8)
    starts, ends = offs[rows], offs[rows + 1]
    L = cfg.max_length
    if fmt == 'text' and cfg.text_chunking:
        (stream, stream_answer), _ = packing.ragged_gather([tokens, answer], starts, ends)
        ws, we, overlap = packing.chunk_windows(len(stream), L, cfg.text_stride or L)
        if plan.holdout:  # held out: the last chunks of the stream
            n_eval = min(max(1, int(round(cfg.eval_fraction * len(ws)))), len(ws) - 1)
            part = slice(len(ws) - n_eval, None) if plan.holdout == 'eval' else slice(0, len(ws) - n_eval)
            ws, we, overlap = ws[part], we[part], overlap[part]
        (tokens, answer), offsets = packing.ragged_gather([stream, stream_answer], ws, we)
        for i in np.nonzero(overlap)[0]:  # targets the previous chunk already learned
            answer[offsets[i] + 1:offsets[i] + 1 + overlap[i]] = 0
        counts = {'num_truncated': 0, 'num_dropped': int(np.sum(ends - starts == 0))}
    else:
        ws, we, keep, n_truncated = packing.truncate_windows(starts, ends, L + 1, cfg.truncation)
        cum = np.concatenate([[0], np.cumsum(answer, dtype=np.int64)])
        answers_left = cum[we] - cum[np.minimum(ws + 1, we)]  # answer targets after truncation
        ok = keep & (we - ws >= 2) & (answers_left > 0)
        (tokens, answer), offsets = packing.ragged_gather([tokens, answer], ws[ok], we[ok])
        counts = {'num_truncated': n_truncated, 'num_dropped': int((~ok).sum())}
    row_offsets, row_examples = packing.pack_rows(np.diff(offsets) - 1, L, cfg.packing)
    fields = dict(tokens=tokens, offsets=offsets, row_offsets=row_offsets, row_examples=row_examples,
                  answer=answer)
    return fields, counts


def _preference(table, rows, cfg):
    """Each selected row -> two examples (chosen, rejected), one pair per packed row."""
    tokens, offs = _ragged(table, 'input_ids', np.int32)
    answer, _ = _ragged(table, 'answer_mask', np.int8)
    split = table.column('pair_split').to_numpy().astype(np.int64)
    start, end = offs[rows], offs[rows + 1]
    mid = start + split[rows]
    ws = np.stack([start, mid], 1).reshape(-1)  # [2 * pairs]: chosen, rejected, chosen, ...
    we = np.stack([mid, end], 1).reshape(-1)
    L = cfg.max_length
    long = (we - ws - 1).reshape(-1, 2).sum(1) > L  # [pairs] positions of both > one row
    budget = np.repeat(np.where(long, L // 2 + 1, np.iinfo(np.int64).max), 2)  # tokens per sequence
    n_truncated = 0
    keep = np.ones(len(rows), bool)
    if cfg.truncation == 'drop':
        keep &= ~long
    else:
        cut = we - ws > budget
        if cfg.truncation == 'right':
            we = np.where(cut, ws + budget, we)
        else:
            ws = np.where(cut, we - budget, ws)
        n_truncated = int(long.sum())
    cum = np.concatenate([[0], np.cumsum(answer, dtype=np.int64)])
    answers_left = (cum[we] - cum[np.minimum(ws + 1, we)]).reshape(-1, 2)  # answer targets after truncation
    keep &= (answers_left > 0).all(1)
    for p in np.nonzero(keep & long)[0]:  # truncation may leave the same answer tokens on both sides: no preference
        a, b = (tokens[ws[2 * p + i] + 1:we[2 * p + i]][answer[ws[2 * p + i] + 1:we[2 * p + i]] > 0] for i in (0, 1))
        keep[p] = not np.array_equal(a, b)
    ok = np.repeat(keep, 2)
    (tokens, answer), offsets = packing.ragged_gather([tokens, answer], ws[ok], we[ok])
    n = int(keep.sum())
    fields = dict(tokens=tokens, offsets=offsets, row_offsets=np.arange(0, 2 * n + 1, 2, dtype=np.int64),
                  row_examples=np.arange(2 * n, dtype=np.int64), answer=answer)
    return fields, {'num_truncated': n_truncated, 'num_dropped': int((~keep).sum())}


def _classification(table, rows, cfg):
    tokens, offs = _ragged(table, 'input_ids', np.int32)
    types, _ = _ragged(table, 'token_type_ids', np.int8)
    labels = table.column('label').to_numpy().astype(np.int32)
    starts, ends = offs[rows], offs[rows + 1]
    ok = ends - starts <= cfg.max_length  # only 'drop' leaves longer ones (the tokenizer truncated the rest)
    (tokens, types), offsets = packing.ragged_gather([tokens, types], starts[ok], ends[ok])
    n = int(ok.sum())
    fields = dict(tokens=tokens, offsets=offsets, row_offsets=np.arange(n + 1, dtype=np.int64),
                  row_examples=np.arange(n, dtype=np.int64), token_types=types, labels=labels[rows[ok]])
    truncated = table.column('truncated').to_numpy()[rows]
    return fields, {'num_truncated': int(truncated.sum()), 'num_dropped': int((~ok).sum())}


def build_dataset(cfg, tokenizer, split='train', num_labels=None) -> Optional[TokenizedData]:
    """Tokenised, packed rows of `split`: 'train', 'eval' (None when no eval is configured) or a named split.

    num_labels: the model's classifier size (classification); a label outside it is a bad row.
    """
    check_data_config(cfg)
    plan = sources.plan_split(cfg, split)
    if plan is None:
        return None
    source = sources.load_raw(plan, cfg)
    opts = formats.resolve_fields(formats.Options.from_config(cfg, num_labels), source.dataset.column_names)
    check_columns(source, opts)
    info = formats.tokenizer_info(tokenizer)
    formats.check_tokenizer(info, opts)
    t0 = time.perf_counter()
    table = tokenize(source, info, opts, cfg.num_proc).with_format('arrow')[:]
    n_raw = table.num_rows
    chunked = cfg.format == 'text' and cfg.text_chunking
    if n_raw == 0:
        raise DataError(f'{source.describe()}: the data has no rows; point --config.{plan.key} at data with '
                        'examples.')
    rows = np.arange(n_raw, dtype=np.int64)
    if plan.holdout and not chunked:
        rows = sources.holdout_rows(n_raw, cfg.eval_fraction, plan.holdout)
    if not verdicts_hold(source, table, rows, info, opts):
        logging.warning('data: cached bad-row verdicts of %s no longer hold (the environment changed?); '
                        'tokenising again', source.describe())
        table = tokenize(source, info, opts, cfg.num_proc, fresh=True).with_format('arrow')[:]
    tokenize_s = time.perf_counter() - t0
    n_selected = len(rows)
    bad_field = table.column('bad_field').to_numpy(zero_copy_only=False)
    bad_reason = table.column('bad_reason').to_numpy(zero_copy_only=False)
    rows, n_bad = bad_rows.apply_policy(rows, bad_field, bad_reason, source, cfg, opts.fields)
    if cfg.format == 'classification':
        fields, counts = _classification(table, rows, cfg)
        task = 'classification'
    elif cfg.format == 'preference':
        fields, counts = _preference(table, rows, cfg)
        task = 'preference'
    else:
        fields, counts = _language_model(table, rows, cfg, plan, cfg.format)
        task = 'lm'
    data = TokenizedData(task=task, max_length=cfg.max_length, pad_id=info.pad_id, **fields)
    if data.num_examples == 0:
        raise DataError(f'data: no examples left in {source.describe()} ({split}) after bad rows and truncation '
                        f'({n_bad} bad, {counts}); check data.fields, data.format and data.max_length.')
    data.stats = dict(split=split, source=source.describe(), num_raw_rows=n_selected, num_bad=n_bad,
                      num_examples=data.num_examples, num_rows=len(data), **counts,
                      num_tokens=int(packing.row_lengths(data).sum()), packing_efficiency=packing.efficiency(data),
                      tokenize_s=tokenize_s)
    if task != 'classification':
        first = data.answer[data.offsets[:-1]]  # an example's first token is never a target
        data.stats['num_loss_tokens'] = int(data.answer.sum(dtype=np.int64) - first.sum(dtype=np.int64))
    else:
        data.stats['num_labels'] = opts.num_labels or (len(opts.label_names) if opts.label_names else
                                                       int(data.labels.max()) + 1)
    logging.info('data %s: %s', split, ', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}'
                                                  for k, v in data.stats.items()))
    return data
