"""`ftjax.data.layout`: the batch layout defined once. The data pipeline's batches (`take_rows`), the shape
structs `compile_check` lowers the step with, and the keys the objectives read all come from it."""
import types

import numpy as np
import pytest

from ftjax.compile_check import abstract_batch
from ftjax.config import default_config
from ftjax.data import layout, take_rows
from ftjax.data.dataset import TokenizedData
from ftjax.objectives import classification, lm, preference


def lm_data(task='lm', ref=False):
    """Two rows of packed examples: row 0 holds examples 0 and 1, row 1 example 2 (for preference: 2 and 3)."""
    tokens = np.arange(1, 15, dtype=np.int32)  # [14]
    offsets = np.array([0, 4, 7, 11, 14])  # examples of 4, 3, 4 and 3 tokens
    rows = np.array([0, 2, 4]) if task == 'preference' else np.array([0, 2, 3])
    return TokenizedData(task=task, max_length=8, pad_id=0, tokens=tokens, offsets=offsets, row_offsets=rows,
                         row_examples=np.arange(4), answer=np.ones(14, np.int8),
                         ref_logps=np.array([[-1.0, -2.0], [-3.0, -4.0]], np.float32) if ref else None)


def classification_data():
    return TokenizedData(task='classification', max_length=6, pad_id=0, tokens=np.arange(1, 8, dtype=np.int32),
                         offsets=np.array([0, 3, 7]), row_offsets=np.array([0, 1, 2]), row_examples=np.arange(2),
                         token_types=np.zeros(7, np.int8), labels=np.array([1, 0], np.int32))


def described(batch):
    return {k: (np.shape(v), np.asarray(v).dtype) for k, v in batch.items()}


@pytest.mark.parametrize('data,task,kw', [
    (lm_data(), 'lm', {}),
    (lm_data('preference', ref=True), 'preference', {'reference': True}),
    (classification_data(), 'classification', {}),
])
def test_take_rows_is_laid_out_as_the_layout_says(data, task, kw):
    batch = take_rows(data, [0, 1])
    assert described(batch) == {k: (s, np.dtype(d)) for k, (s, d) in
                                layout.shapes(task, 2, data.max_length, **kw).items()}
    with_valid = take_rows(data, [1, 1], valid=[True, False])  # a short last eval batch, padded
    assert described(with_valid) == {k: (s, np.dtype(d)) for k, (s, d) in
                                     layout.shapes(task, 2, data.max_length, valid=True, **kw).items()}
    if task != 'classification':
        assert with_valid['loss_mask'][1].sum() == 0 and with_valid['loss_mask'][0].sum() > 0


def test_lm_rows_values():
    batch = take_rows(lm_data(), [0])
    assert batch['input_ids'][0].tolist() == [1, 2, 3, 5, 6, 0, 0, 0]  # [seq]: two examples packed, then pad
    assert batch['target_ids'][0].tolist() == [2, 3, 4, 6, 7, 0, 0, 0]
    assert batch['segment_ids'][0].tolist() == [1, 1, 1, 2, 2, 0, 0, 0]
    assert batch['positions'][0].tolist() == [0, 1, 2, 0, 1, 0, 0, 0]
    assert take_rows(lm_data('preference', ref=True), [1])['ref_logps'].tolist() == [[-3.0, -4.0]]


def test_objectives_read_the_layouts_keys():
    for objective, task in ((lm, 'lm'), (classification, 'classification'), (preference, 'preference')):
        assert set(objective.KEYS) <= set(layout.layout(task)), task
    with pytest.raises(ValueError, match='no batch layout'):
        layout.layout('regression')


@pytest.mark.parametrize('task,over,want,kw', [
    ('lm', {}, 'lm', {}),
    ('classification', {}, 'classification', {}),
    ('lm', {'data.format': 'preference', 'align.reference': 'precomputed'}, 'preference', {'reference': True}),
])
def test_compile_check_lowers_with_the_same_layout(task, over, want, kw):
    c = default_config()
    c.train.batch_size, c.data.max_length = 4, 16
    for key, value in over.items():
        group, name = key.split('.')
        c[group][name] = value
    got = abstract_batch(c, types.SimpleNamespace(cfg=types.SimpleNamespace(task=task)), None)  # a model's task
    assert {k: (v.shape, v.dtype) for k, v in got.items()} == {
        k: (s, np.dtype(d)) for k, (s, d) in layout.shapes(want, 4, 16, **kw).items()}
