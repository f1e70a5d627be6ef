"""The batch layout, defined once: the keys, shapes and dtypes of the batches the data pipeline builds
(`packing.take_rows`), the keys each objective reads and the train step checks (`REQUIRED`,
`ftjax.objectives`), and the shape structs `compile_check` lowers the step with (`abstract_batch`).

  lm              input_ids, target_ids (already shifted), loss_mask (float32), segment_ids (0 = pad),
                  positions: all [batch, seq]
  classification  input_ids, attention_mask, token_type_ids [batch, seq], label [batch]
  preference      an lm batch of one pair per row (segment 1 chosen, 2 rejected), plus ref_logps [batch, 2]
                  (float32) when the reference's log-probs were computed before training
  grpo            an lm batch of one prompt + sampled completion per row (loss_mask on the completion), plus
                  old_logps [batch, seq] (the sampler's log p of each completion token) and advantages [batch],
                  plus ref_logps [batch, seq] (float32) when the reference is the starting model held aside
                  (full / partial fine-tuning with align.beta > 0)

Any batch may add 'valid' [batch] (bool): the padding rows of a short last eval batch are False.
"""
import jax
import numpy as np

SEQ = 'seq'  # a dimension of data.max_length tokens; every other dimension is the batch or a constant
LM = {  # key: (dims after the batch dim, dtype)
    'input_ids': ((SEQ,), np.int32),  # [batch, seq]
    'target_ids': ((SEQ,), np.int32),  # [batch, seq] the next token
    'loss_mask': ((SEQ,), np.float32),  # [batch, seq] 1 on answer targets
    'segment_ids': ((SEQ,), np.int32),  # [batch, seq] 1, 2, ... per packed example; 0 = pad
    'positions': ((SEQ,), np.int32),  # [batch, seq] restart at 0 per example
}
CLASSIFICATION = {
    'input_ids': ((SEQ,), np.int32),  # [batch, seq]
    'attention_mask': ((SEQ,), np.int32),  # [batch, seq] 1 on tokens, 0 on padding
    'token_type_ids': ((SEQ,), np.int32),  # [batch, seq] sentence A / B
    'label': ((), np.int32),  # [batch] class id
}
REFERENCE = {'preference': {'ref_logps': ((2,), np.float32)},  # [batch, 2] chosen / rejected answer log-probs
             'grpo': {'ref_logps': ((SEQ,), np.float32)}}  # [batch, seq] log p of each completion token
RL = {'old_logps': ((SEQ,), np.float32), 'advantages': ((), np.float32)}  # [batch, seq], [batch]
VALID = {'valid': ((), np.bool_)}  # [batch] False on the padding rows of a short last eval batch
LAYOUTS = {'lm': LM, 'classification': CLASSIFICATION, 'preference': LM, 'grpo': {**LM, **RL}}
# What a step cannot run without (the rest has defaults: no packing, no padding, one segment type).
REQUIRED = {'lm': ('input_ids', 'target_ids', 'loss_mask'), 'classification': ('input_ids', 'label'),
            'preference': ('input_ids', 'target_ids', 'loss_mask', 'segment_ids'),
            'grpo': ('input_ids', 'target_ids', 'loss_mask', 'segment_ids', 'positions', 'old_logps', 'advantages')}


def layout(task, reference=False, valid=False):
    """{key: (dims after the batch dim, dtype)} of a `task` batch ('lm', 'classification', 'preference');
    `reference`: with the reference's log-probs (computed before training, or at each rollout for grpo);
    `valid`: with the eval batches' row flags."""
    if task not in LAYOUTS:
        raise ValueError(f'no batch layout for the task {task!r}; the tasks are {sorted(LAYOUTS)}.')
    if reference and task not in REFERENCE:
        raise ValueError(f'a {task!r} batch has no reference log-probs; {sorted(REFERENCE)} batches do.')
    return {**LAYOUTS[task], **(REFERENCE[task] if reference else {}), **(VALID if valid else {})}


def shapes(task, batch_size, max_length, **kw):
    """{key: (shape, dtype)} of one batch of `batch_size` rows of `max_length` tokens."""
    return {k: ((batch_size, *(max_length if d == SEQ else d for d in dims)), dtype)
            for k, (dims, dtype) in layout(task, **kw).items()}


def empty(task, batch_size, max_length, pad_id, **kw):
    """Host arrays of a batch before rows are copied in: token ids `pad_id`, everything else 0."""
    return {k: np.full(shape, pad_id if k in ('input_ids', 'target_ids') else 0, dtype)
            for k, (shape, dtype) in shapes(task, batch_size, max_length, **kw).items()}


def abstract_batch(task, batch_size, max_length, sharding=None, **kw):
    """Shape structs of one global batch (what `jax.jit(...).lower` takes), split by `sharding`."""
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
            for k, (shape, dtype) in shapes(task, batch_size, max_length, **kw).items()}

