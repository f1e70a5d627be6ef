"""The data pipeline: hand-checked loss masks per format, TSV, packing, resume, multi-host slices,
bad rows, the tokenisation cache, eval splits and global arrays. Tiny files written to tmp_path."""
import csv
import json

import jax
import numpy as np
import pytest

from ftjax import data as data_lib
from ftjax.data import formats, packing
from ftjax.errors import DataError
from tests import tiny

IM_START, IM_END = 1, 2


@pytest.fixture(scope='module')
def tok():
    return tiny.make_tokenizer()


def enc(tok, text):
    return list(tok(text, add_special_tokens=False)['input_ids'])


def make_cfg(tmp_path, path, **overrides):
    return tiny.data_config(tmp_path, path, **{'max_length': 256, **overrides})


def first_row(data):
    return data_lib.take_rows(data, [0])


def check_lm_row(batch, i, tokens, answer_mask):
    """Row i holds one example `tokens` (unshifted) with per-token `answer_mask`, then padding."""
    n = len(tokens) - 1
    assert batch['input_ids'][i, :n].tolist() == tokens[:-1]
    assert batch['target_ids'][i, :n].tolist() == tokens[1:]
    assert batch['loss_mask'][i, :n].tolist() == [float(m) for m in answer_mask[1:]]
    assert batch['positions'][i, :n].tolist() == list(range(n))
    assert (batch['segment_ids'][i, :n] == 1).all() and (batch['segment_ids'][i, n:] == 0).all()
    assert (batch['loss_mask'][i, n:] == 0).all()


# ---------------------------------------------------------------- formats: exact loss masks

def test_alpaca_loss_mask_covers_output_and_eos(tok, tmp_path):
    path = tiny.write_jsonl(tmp_path / 'a.jsonl', [
        {'instruction': 'Add', 'input': '1 + 2', 'output': '3'},
        {'instruction': 'Name the capital of France', 'input': '', 'output': 'Paris.'}])
    c = make_cfg(tmp_path, path, format='alpaca', shuffle=False, prompt_template='Q: {instruction}\nIn: {input}\nA: ',
                 prompt_template_no_input='Q: {instruction}\nA: ')
    data = data_lib.build_dataset(c, tok)
    batch = data_lib.take_rows(data, [0, 1])
    for i, (prompt, answer) in enumerate([('Q: Add\nIn: 1 + 2\nA: ', '3'),
                                          ('Q: Name the capital of France\nA: ', 'Paris.')]):
        p, a = enc(tok, prompt), enc(tok, answer) + [tok.eos_token_id]
        check_lm_row(batch, i, p + a, [0] * len(p) + [1] * len(a))
    assert data.stats['num_loss_tokens'] == 2 + len(enc(tok, 'Paris.')) + 1


def test_prompt_completion_loss_mask_with_separator_and_no_eos(tok, tmp_path):
    path = tiny.write_jsonl(tmp_path / 'pc.jsonl', [{'question': 'What is 2 + 2?', 'answer': 'It is 4.'}])
    c = make_cfg(tmp_path, path, format='prompt_completion', prompt_separator='\n', add_eos=False,
                 fields={'prompt': 'question', 'completion': 'answer'})
    p, a = enc(tok, 'What is 2 + 2?\n'), enc(tok, 'It is 4.')
    check_lm_row(first_row(data_lib.build_dataset(c, tok)), 0, p + a, [0] * len(p) + [1] * len(a))


def test_chat_loss_mask_covers_assistant_content_and_end_of_turn(tok, tmp_path):
    msgs = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Capital of France?'},
            {'role': 'assistant', 'content': 'Paris.'}, {'role': 'user', 'content': 'And 2 + 2?'},
            {'role': 'assistant', 'content': '4'}]
    path = tiny.write_jsonl(tmp_path / 'chat.jsonl', [{'messages': msgs}])
    data = data_lib.build_dataset(make_cfg(tmp_path, path, format='chat', max_length=128), tok)
    nl = enc(tok, '\n')
    tokens, mask = [], []
    for m in msgs:  # <|im_start|>role\ncontent<|im_end|>\n ; learn content + <|im_end|> of assistant turns
        head, body = [IM_START] + enc(tok, m['role'] + '\n'), enc(tok, m['content']) + [IM_END]
        learn = int(m['role'] == 'assistant')
        tokens += head + body + nl
        mask += [0] * len(head) + [learn] * len(body) + [0] * len(nl)
    assert tokens == tok.apply_chat_template(msgs, tokenize=True)['input_ids']  # the pieces are the real thing
    check_lm_row(first_row(data), 0, tokens, mask)


def test_chat_sharegpt_keys_and_roles(tok, tmp_path):
    conv = [{'from': 'human', 'value': 'Hi'}, {'from': 'gpt', 'value': 'Hello.'}]
    path = tiny.write_jsonl(tmp_path / 'sg.jsonl', [{'conversations': conv}])
    for fields in ({}, {'messages': 'conversations', 'role': 'from', 'content': 'value'}):  # default alternatives
        row = first_row(data_lib.build_dataset(make_cfg(tmp_path, path, format='chat', fields=fields), tok))
        learned = row['target_ids'][0][row['loss_mask'][0] == 1].tolist()
        assert learned == enc(tok, 'Hello.') + [IM_END]


def test_field_alternatives_when_train_and_eval_name_a_column_differently(tok, tmp_path):
    (tmp_path / 'train.tsv').write_text('label\tsentence\n1\tgood\n')
    (tmp_path / 'dev.tsv').write_text('label\tcontent\n0\tbad\n')
    c = make_cfg(tmp_path, tmp_path / 'train.tsv', format='classification', eval_path=str(tmp_path / 'dev.tsv'),
                 fields={'text': 'sentence|content'})
    for split, text, label in (('train', 'good', 1), ('eval', 'bad', 0)):
        row = first_row(data_lib.build_dataset(c, tok, split))
        assert row['input_ids'][0, :len(enc(tok, text))].tolist() == enc(tok, text) and row['label'][0] == label
    c.fields.text = 'sentence'
    with pytest.raises(ValueError, match="dev.tsv: field 'text' needs column 'sentence'"):
        data_lib.build_dataset(c, tok, 'eval')


def test_alpaca_through_chat_template(tok, tmp_path):
    path = tiny.write_jsonl(tmp_path / 'a.jsonl', [{'instruction': 'Say hi', 'output': 'hi'}])
    c = make_cfg(tmp_path, path, format='alpaca', use_chat_template=True, prompt_template_no_input='{instruction}')
    row = first_row(data_lib.build_dataset(c, tok))
    msgs = [{'role': 'user', 'content': 'Say hi'}, {'role': 'assistant', 'content': 'hi'}]
    n = len(tok.apply_chat_template(msgs, tokenize=True)['input_ids']) - 1
    assert row['input_ids'][0, :n].tolist() == tok.apply_chat_template(msgs, tokenize=True)['input_ids'][:-1]
    assert row['target_ids'][0][row['loss_mask'][0] == 1].tolist() == enc(tok, 'hi') + [IM_END]


def test_text_loss_on_all_tokens(tok, tmp_path):
    path = tiny.write_jsonl(tmp_path / 't.jsonl', [{'text': 'The quick brown fox.'}, {'text': '   '}])
    data = data_lib.build_dataset(make_cfg(tmp_path, path, format='text', text_chunking=False), tok)
    ids = enc(tok, 'The quick brown fox.') + [tok.eos_token_id]
    check_lm_row(first_row(data), 0, ids, [1] * len(ids))
    assert data.stats['num_examples'] == 1 and data.stats['num_dropped'] == 1  # the blank text


def test_text_file_chunks_with_stride_learn_each_token_once(tok, tmp_path):
    text = 'The quick brown fox jumps over the lazy dog. ' * 6
    (tmp_path / 'corpus.txt').write_text(text)
    c = make_cfg(tmp_path, tmp_path / 'corpus.txt', format='text', max_length=16, text_stride=10, add_eos=False)
    data = data_lib.build_dataset(c, tok)
    stream = enc(tok, text.rstrip('\n'))
    batch = data_lib.take_rows(data, np.arange(len(data)))
    learned = np.zeros(len(stream), int)
    for r in range(len(data)):
        start = r * 10
        n = int((batch['segment_ids'][r] > 0).sum())
        assert batch['input_ids'][r, :n].tolist() == stream[start:start + n]
        assert batch['target_ids'][r, :n].tolist() == stream[start + 1:start + 1 + n]
        learned[start + 1:start + 1 + n] += batch['loss_mask'][r, :n].astype(int)
    assert learned[0] == 0 and (learned[1:] == 1).all()  # overlapping targets are learned once


def test_classification_string_labels_and_pairs(tok, tmp_path):
    path = tiny.write_jsonl(tmp_path / 'c.jsonl', [{'s1': 'great movie', 's2': 'loved it', 'y': 'positive'},
                                                    {'s1': 'terrible plot', 's2': 'hated it', 'y': 'negative'}])
    c = make_cfg(tmp_path, path, format='classification', label_names=['negative', 'positive'], max_length=16,
                 fields={'text': 's1', 'text_pair': 's2', 'label': 'y'})
    data = data_lib.build_dataset(c, tok)
    batch = data_lib.take_rows(data, [0, 1])
    assert batch['label'].tolist() == [1, 0] and batch['label'].dtype == np.int32
    e = tok('great movie', 'loved it', return_token_type_ids=True)
    n = len(e['input_ids'])
    assert batch['input_ids'][0, :n].tolist() == e['input_ids']
    assert (batch['input_ids'][0, n:] == tok.pad_token_id).all()
    assert batch['token_type_ids'][0, :n].tolist() == e['token_type_ids']
    assert batch['attention_mask'][0].tolist() == [1] * n + [0] * (16 - n)
    assert data.stats['num_labels'] == 2 and data.stats['num_truncated'] == 0
    c.max_length = 4
    truncated = data_lib.build_dataset(c, tok)
    assert truncated.stats['num_truncated'] == 2
    short = data_lib.take_rows(truncated, [0])
    assert short['input_ids'][0].tolist() == tok('great movie', 'loved it', truncation=True, max_length=4)['input_ids']


def test_unquoted_tsv_with_quotes_bom_and_na(tok, tmp_path):
    rows = [('1', '"the witness", he said'), ('0', 'an "odd" one'), ('1', 'NA'), ('0', "it's 007")]
    path = tmp_path / 'train.tsv'
    path.write_text('\ufefflabel\tsentence\n' + ''.join(f'{y}\t{s}\n' for y, s in rows), encoding='utf-8')
    c = make_cfg(tmp_path, path, format='classification', fields={'text': 'sentence'}, shuffle=False)
    data = data_lib.build_dataset(c, tok)
    assert data.num_examples == 4
    batch = data_lib.take_rows(data, np.arange(4))
    for i, (y, s) in enumerate(rows):
        ids = enc(tok, s)
        assert batch['input_ids'][i, :len(ids)].tolist() == ids and batch['label'][i] == int(y)


def test_csv_quoted_reads_commas(tok, tmp_path):
    path = tmp_path / 'd.csv'
    with open(path, 'w', newline='') as f:
        csv.writer(f).writerows([['prompt', 'completion'], ['a, b', 'c "d"']])
    data = data_lib.build_dataset(make_cfg(tmp_path, path, format='prompt_completion', add_eos=False), tok)
    p, a = enc(tok, 'a, b'), enc(tok, 'c "d"')
    check_lm_row(first_row(data), 0, p + a, [0] * len(p) + [1] * len(a))


def test_generation_eval_rows_come_from_the_training_loader(tmp_path):
    """The raw rows a generation eval answers (`raw_rows`): a tsv eval file read as training reads it (prompt and
    reference through the alpaca template), or the held-out fraction of the train file."""
    path = tmp_path / 'dev.tsv'
    path.write_text('label\tsentence\n1\ta fine film\n0\tdull\n1\tgreat\n', encoding='utf-8')
    c = make_cfg(tmp_path, path, format='alpaca', fields={'instruction': 'sentence', 'output': 'label'},
                 prompt_template_no_input='Review: {instruction}\nLabel:')
    c.eval_path = str(path)
    rows = data_lib.raw_rows(c, 'eval', 2)
    assert rows == [{'label': '1', 'sentence': 'a fine film'}, {'label': '0', 'sentence': 'dull'}]
    assert data_lib.prompt_and_answer(rows[1], c) == ('Review: dull\nLabel:', '0')
    c.eval_path, c.eval_fraction = None, 0.34
    held_out = data_lib.raw_rows(c, 'eval', 10)
    everything = [{'label': '1', 'sentence': 'a fine film'}, {'label': '0', 'sentence': 'dull'},
                  {'label': '1', 'sentence': 'great'}]
    assert len(held_out) == 1 and held_out[0] in everything
    c.eval_fraction = 0.0
    with pytest.raises(DataError, match='no eval split'):
        data_lib.raw_rows(c, 'eval', 1)


# ---------------------------------------------------------------- truncation and packing

def test_truncation_policies(tok, tmp_path):
    path = tiny.write_jsonl(tmp_path / 'pc.jsonl', [{'prompt': 'a b c d e f g h', 'completion': 'x y z'}])
    p, a = enc(tok, 'a b c d e f g h'), enc(tok, 'x y z') + [tok.eos_token_id]
    full, mask = p + a, [0] * len(p) + [1] * len(a)
    L = len(full) - 3  # keeps L + 1 tokens
    right = data_lib.build_dataset(make_cfg(tmp_path, path, format='prompt_completion', max_length=L), tok)
    check_lm_row(first_row(right), 0, full[:L + 1], mask[:L + 1])
    assert right.stats['num_truncated'] == 1
    left = data_lib.build_dataset(make_cfg(tmp_path, path, format='prompt_completion', max_length=L,
                                           truncation='left'), tok)
    check_lm_row(first_row(left), 0, full[-(L + 1):], mask[-(L + 1):])
    with pytest.raises(ValueError, match='no examples left'):
        data_lib.build_dataset(make_cfg(tmp_path, path, format='prompt_completion', max_length=L,
                                        truncation='drop'), tok)
    with pytest.raises(ValueError, match='no examples left'):  # right truncation that cuts the whole answer
        data_lib.build_dataset(make_cfg(tmp_path, path, format='prompt_completion', max_length=len(p) - 1), tok)


def test_pack_rows_best_fit_decreasing():
    offsets, examples = packing.pack_rows([5, 3, 4, 2, 6], capacity=8)
    rows = [examples[offsets[r]:offsets[r + 1]].tolist() for r in range(len(offsets) - 1)]
    assert rows == [[4, 3], [0, 1], [2]]  # 6+2, 5+3, 4


def test_packing_segments_positions_and_efficiency(tok, tmp_path):
    answers = ['one', 'two words', 'three words here', 'four', 'five five five five five']
    path = tiny.write_jsonl(tmp_path / 'pc.jsonl', [{'prompt': f'Q{i}: ', 'completion': a}
                                                     for i, a in enumerate(answers)])
    c = make_cfg(tmp_path, path, format='prompt_completion', packing=True, max_length=24)
    data = data_lib.build_dataset(c, tok)
    examples = {}
    for i, a in enumerate(answers):
        pp, aa = enc(tok, f'Q{i}: '), enc(tok, a) + [tok.eos_token_id]
        examples[tuple(pp + aa)] = [0] * len(pp) + [1] * len(aa)
    batch = data_lib.take_rows(data, np.arange(len(data)))
    assert len(data) < len(answers)
    seen = 0
    for r in range(len(data)):
        segs = batch['segment_ids'][r]
        for s in range(1, segs.max() + 1):
            (idx,) = np.nonzero(segs == s)
            assert (np.diff(idx) == 1).all() and batch['positions'][r, idx].tolist() == list(range(len(idx)))
            toks = batch['input_ids'][r, idx].tolist() + [int(batch['target_ids'][r, idx[-1]])]
            mask = examples[tuple(toks)]  # the segment is exactly one example: no target crosses over
            assert batch['loss_mask'][r, idx].tolist() == [float(m) for m in mask[1:]]
            seen += 1
        assert (batch['loss_mask'][r, segs == 0] == 0).all()
    assert seen == len(answers)
    non_pad = sum(len(k) - 1 for k in examples)
    assert data.stats['num_tokens'] == non_pad
    assert data.stats['packing_efficiency'] == pytest.approx(non_pad / (len(data) * 24))


# ---------------------------------------------------------------- iterator: resume, processes, global arrays

def lm_data(tok, tmp_path, n=10):
    path = tiny.write_jsonl(tmp_path / 'n.jsonl', [{'prompt': f'p{i}', 'completion': f'answer {i}'}
                                                    for i in range(n)])
    return data_lib.build_dataset(make_cfg(tmp_path, path, format='prompt_completion'), tok)


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_resume_across_epoch_boundary(tok, tmp_path):
    data = lm_data(tok, tmp_path)  # 10 rows, batches of 4: epochs end inside steps 2 and 4
    straight = data_lib.make_iterator(data, 4, seed=3)
    expected = [next(straight) for _ in range(8)]
    it = data_lib.make_iterator(data, 4, seed=3)
    for _ in range(2):
        next(it)
    state = json.loads(json.dumps(it.state))  # as stored in a checkpoint
    assert all(isinstance(v, int) for v in state.values()) and state['step'] == 2
    resumed = data_lib.make_iterator(data, 4, seed=3)
    resumed.restore(state)
    for k in range(2, 8):
        assert_batches_equal(next(resumed), expected[k])
    again = data_lib.make_iterator(data, 4, seed=3, state={'step': 5})
    assert_batches_equal(next(again), expected[5])
    order = np.concatenate([straight.indices(k) for k in range(5)])  # 20 positions = 2 epochs
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:]) == list(range(10))
    assert order[:10].tolist() != order[10:].tolist()  # a new permutation each epoch
    other_seed = data_lib.make_iterator(data, 4, seed=4)
    assert other_seed.indices(0).tolist() != straight.indices(0).tolist()


def test_unshuffled_order_and_small_data(tok, tmp_path):
    data = lm_data(tok, tmp_path, n=3)
    it = data_lib.make_iterator(data, 4, seed=0, shuffle=False)
    assert it.indices(0).tolist() == [0, 1, 2, 0] and it.indices(1).tolist() == [1, 2, 0, 1]


def test_two_processes_slices_are_disjoint_and_cover_the_batch(tok, tmp_path):
    data = lm_data(tok, tmp_path)
    whole = data_lib.make_iterator(data, 4, seed=1)
    procs = [data_lib.make_iterator(data, 4, seed=1, process_index=p, process_count=2) for p in range(2)]
    for step in range(4):
        idx = whole.indices(step)
        mine = [idx[p.local] for p in procs]
        assert set(range(4)) == {i for p in range(2) for i in range(4)[procs[p].local]}
        assert not set(range(4)[procs[0].local]) & set(range(4)[procs[1].local])
        np.testing.assert_array_equal(np.concatenate(mine), idx)
        full, parts = next(whole), [next(p) for p in procs]
        assert parts[0]['input_ids'].shape == (2, data.max_length)
        for k in full:
            np.testing.assert_array_equal(np.concatenate([parts[0][k], parts[1][k]]), full[k])
    with pytest.raises(ValueError, match='not divisible'):
        data_lib.make_iterator(data, 5, seed=1, process_index=0, process_count=2)


def test_pad_to_multiple_of_trims_each_batch_to_its_longest_row(tok, tmp_path):
    rows = [{'s': 'a' * (40 if i == 5 else 1 + (5 * i) % 17), 'y': i % 2} for i in range(13)]  # a char a token
    c = make_cfg(tmp_path, tiny.write_jsonl(tmp_path / 'v.jsonl', rows), format='classification', max_length=24,
                 fields={'text': 's', 'label': 'y'})
    data = data_lib.build_dataset(c, tok)
    lengths = data_lib.row_lengths(data)  # [13]
    assert lengths.min() < 8 and lengths.max() == 24  # the longest was truncated to max_length
    full = data_lib.make_iterator(data, 4, seed=2)
    cut = data_lib.make_iterator(data, 4, seed=2, pad_to_multiple_of=8)
    procs = [data_lib.make_iterator(data, 4, seed=2, process_index=p, process_count=2, pad_to_multiple_of=8)
             for p in range(2)]
    seen = set()
    for step in range(8):
        whole, short, parts = next(full), next(cut), [next(p) for p in procs]
        need = int(lengths[full.indices(step)].max())
        n = short['input_ids'].shape[1]
        seen.add(n)
        assert n == min(24, -(-need // 8) * 8)
        for k in whole:  # the same rows, cut where every row is padding
            width = n if whole[k].ndim == 2 else None
            np.testing.assert_array_equal(short[k], whole[k][:, :width] if width else whole[k])
            if width:
                assert (whole[k][:, n:] == (tok.pad_token_id if k == 'input_ids' else 0)).all()
            # each process builds its rows at the global batch's length, so the arrays join
            np.testing.assert_array_equal(np.concatenate([parts[0][k], parts[1][k]]), short[k])
    assert len(seen) > 1  # batches of different lengths were made
    assert data_lib.batch_length(np.array([3, 9]), 24, 0) == 24
    assert data_lib.batch_length(np.array([3, 9]), 24, 8) == 16
    assert data_lib.batch_length(np.array([3, 23]), 24, 16) == 24  # never above max_length
    assert data_lib.batch_length(np.array([0, 0]), 24, 8) == 8


def test_to_global_on_a_one_device_mesh(tok, tmp_path):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ('data', 'fsdp', 'tensor'))
    batch = next(data_lib.make_iterator(lm_data(tok, tmp_path), 4, seed=0))
    out = data_lib.to_global(batch, NamedSharding(mesh, PartitionSpec(('data', 'fsdp'))))
    for k, v in out.items():
        assert isinstance(v, jax.Array) and v.shape == batch[k].shape and v.dtype == batch[k].dtype
        np.testing.assert_array_equal(np.asarray(v), batch[k])
    if len(jax.devices()) >= 8:  # conftest's 8 CPU devices: rows split over data x fsdp = 4 x 2
        mesh8 = Mesh(np.array(jax.devices()[:8]).reshape(4, 2, 1), ('data', 'fsdp', 'tensor'))
        batch = next(data_lib.make_iterator(lm_data(tok, tmp_path), 8, seed=0))
        out = data_lib.to_global(batch, NamedSharding(mesh8, PartitionSpec(('data', 'fsdp'))))
        assert out['input_ids'].shape == batch['input_ids'].shape
        assert {s.data.shape for s in out['input_ids'].addressable_shards} == {(1, batch['input_ids'].shape[1])}
        np.testing.assert_array_equal(np.asarray(out['loss_mask']), batch['loss_mask'])


def test_take_rows_valid_masks_padding_rows(tok, tmp_path):
    out = data_lib.take_rows(lm_data(tok, tmp_path), [0, 1], valid=[True, False])
    assert out['valid'].tolist() == [True, False]
    assert out['loss_mask'][0].sum() > 0 and out['loss_mask'][1].sum() == 0


# ---------------------------------------------------------------- bad rows

BAD_CASES = [  # (format, rows, bad row index, field, words in the reason, config overrides)
    ('alpaca', [{'instruction': 'a', 'output': 'b'}, {'instruction': 'c'}], 1, 'output', 'missing', {}),
    ('alpaca', [{'instruction': 'a', 'output': 'b'}, {'instruction': 'c', 'output': 'd'},
                {'instruction': 'e', 'output': 7}], 2, 'output', 'not a string', {}),
    ('prompt_completion', [{'prompt': 'a', 'completion': '  '}, {'prompt': 'b', 'completion': 'c'}], 0,
     'completion', 'empty', {}),
    ('classification', [{'text': 'good', 'label': 'positive'}, {'text': 'bad', 'label': 'meh'}], 1, 'label',
     'not in data.label_names', {'label_names': ['negative', 'positive']}),
    ('chat', [{'messages': [{'role': 'user', 'content': 'hi'}]}], 0, 'messages', 'no assistant', {}),
]


@pytest.mark.parametrize('fmt,rows,bad,field,reason,over', BAD_CASES)
def test_bad_row_error_names_file_row_and_field(tok, tmp_path, fmt, rows, bad, field, reason, over):
    path = tiny.write_jsonl(tmp_path / 'bad.jsonl', rows)
    with pytest.raises(ValueError) as e:
        data_lib.build_dataset(make_cfg(tmp_path, path, format=fmt, **over), tok)
    msg = str(e.value)
    assert str(path) in msg and f'row {bad}:' in msg and f"field '{field}'" in msg and reason in msg, msg


@pytest.mark.parametrize('fmt,rows,bad,field,reason,over', BAD_CASES)
def test_bad_row_skip_counts_and_caps(tok, tmp_path, fmt, rows, bad, field, reason, over):
    good = [r for i, r in enumerate(rows) if i != bad]
    good = good or [{'messages': [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'}]}]
    path = tiny.write_jsonl(tmp_path / 'bad.jsonl', rows + good * 20)
    data = data_lib.build_dataset(make_cfg(tmp_path, path, format=fmt, on_bad_row='skip', max_bad_fraction=0.1,
                                           **over), tok)
    assert data.stats['num_bad'] == 1 and data.stats['num_examples'] == len(rows) - 1 + len(good) * 20
    with pytest.raises(ValueError, match='more than data.max_bad_fraction'):
        data_lib.build_dataset(make_cfg(tmp_path, path, format=fmt, on_bad_row='skip', max_bad_fraction=0.001,
                                        **over), tok)


def test_missing_column_is_a_config_error(tok, tmp_path):
    path = tiny.write_jsonl(tmp_path / 'x.jsonl', [{'question': 'q', 'answer': 'a'}])
    with pytest.raises(ValueError, match=r"field 'prompt' needs column 'prompt'.*fields.prompt"):
        data_lib.build_dataset(make_cfg(tmp_path, path, format='prompt_completion', on_bad_row='skip'), tok)


# ---------------------------------------------------------------- cache and eval splits

def test_second_build_reads_the_tokenisation_cache(tok, tmp_path, monkeypatch):
    calls = []
    real = formats.FORMATS['alpaca']
    monkeypatch.setitem(formats.FORMATS, 'alpaca', lambda row, info, opts: calls.append(1) or real(row, info, opts))
    path = tiny.write_jsonl(tmp_path / 'a.jsonl', [{'instruction': f'i{k}', 'output': f'o{k}'} for k in range(5)])
    c = make_cfg(tmp_path, path, format='alpaca')
    first = data_lib.build_dataset(c, tok)
    assert len(calls) == 5
    second = data_lib.build_dataset(c, tok)
    assert len(calls) == 5  # no re-tokenisation
    np.testing.assert_array_equal(first.tokens, second.tokens)
    c.prompt_template_no_input = '{instruction} -> '  # another template: tokenised again
    data_lib.build_dataset(c, tok)
    assert len(calls) == 10
    tiny.write_jsonl(path, [{'instruction': 'new', 'output': 'rows'}])  # a changed file: tokenised again
    assert data_lib.build_dataset(c, tok).num_examples == 1 and len(calls) == 11


def test_eval_split_held_out_fraction_path_and_directory(tok, tmp_path):
    path = tiny.write_jsonl(tmp_path / 'all.jsonl', [{'prompt': f'p{i}', 'completion': f'c{i}'} for i in range(20)])
    c = make_cfg(tmp_path, path, format='prompt_completion', add_eos=False)
    assert data_lib.build_dataset(c, tok, 'eval') is None  # no eval configured
    c.eval_fraction = 0.25
    train, held = data_lib.build_dataset(c, tok, 'train'), data_lib.build_dataset(c, tok, 'eval')
    assert (train.num_examples, held.num_examples) == (15, 5)
    key = lambda d: {tuple(d.tokens[s:e]) for s, e in zip(d.offsets[:-1], d.offsets[1:])}  # noqa: E731
    assert not key(train) & key(held) and len(key(train) | key(held)) == 20
    d = tmp_path / 'dir'
    d.mkdir()
    tiny.write_jsonl(d / 'train.jsonl', [{'prompt': 'a', 'completion': 'b'}] * 3)
    tiny.write_jsonl(d / 'dev.jsonl', [{'prompt': 'a', 'completion': 'b'}] * 2)
    c = make_cfg(tmp_path, d, format='prompt_completion', eval_split='validation')
    assert data_lib.build_dataset(c, tok).num_examples == 3
    assert data_lib.build_dataset(c, tok, 'eval').num_examples == 2
    c = make_cfg(tmp_path, path, format='prompt_completion', eval_path=str(d / 'dev.jsonl'))
    assert data_lib.build_dataset(c, tok, 'eval').num_examples == 2


def test_config_placeholders_take_overrides():
    c = data_lib.default_data_config()
    c.eval_path, c.num_labels, c.label_names, c.text_stride = '/x.jsonl', 3, ['a', 'b'], 128
    c.fields.text_pair = 'sentence2'
    assert (c.eval_path, c.num_labels, c.label_names, c.fields.text_pair) == ('/x.jsonl', 3, ['a', 'b'], 'sentence2')
    with pytest.raises(ValueError, match='format'):
        c.path, c.format = 'x.jsonl', 'sharegpt'
        data_lib.check_data_config(c)


def test_prompt_and_answer_match_training(tok, tmp_path):
    """Generation eval's prompts are the training prompts (raw text, or messages for the chat template)."""
    row = {'instruction': 'Add', 'input': '', 'output': '3'}
    path = tiny.write_jsonl(tmp_path / 'a.jsonl', [row])
    for use_chat in (False, True):
        c = make_cfg(tmp_path, path, format='alpaca', use_chat_template=use_chat)
        prompt, answer = formats.prompt_and_answer(row, c)
        assert answer == '3'
        if use_chat:
            assert prompt == [{'role': 'user', 'content': c.prompt_template_no_input.format(instruction='Add')}]
            ids = tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)['input_ids']
        else:
            ids = enc(tok, prompt)
        example = first_row(data_lib.build_dataset(c, tok))
        assert example['input_ids'][0, :len(ids)].tolist() == ids
        assert example['loss_mask'][0, :len(ids) - 1].sum() == 0 and example['loss_mask'][0, len(ids) - 1] == 1
    chat_row = {'messages': [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Yo'}]}
    assert formats.prompt_and_answer(chat_row, make_cfg(tmp_path, path, format='chat')) == (
        [{'role': 'user', 'content': 'Hi'}], 'Yo')


def test_missing_files_and_unsupported_types_are_clear(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        data_lib.build_dataset(make_cfg(tmp_path, tmp_path / 'nope.jsonl', format='text'), tok)
    with pytest.raises(FileNotFoundError, match='no files match'):
        data_lib.build_dataset(make_cfg(tmp_path, tmp_path / '*.jsonl', format='text'), tok)
    (tmp_path / 'x.xml').write_text('<a/>')
    with pytest.raises(ValueError, match="unsupported file type '.xml'"):
        data_lib.build_dataset(make_cfg(tmp_path, tmp_path / 'x.xml', format='text'), tok)
