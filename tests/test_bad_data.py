"""Hostile data: every fault of a file, a column or a row stops with ONE line naming the file, the
line or row, the config key and the fix; a fault of the environment (jinja2 missing) is never
blamed on the data, never cached, and a run after the fix tokenises afresh. Tiny files in tmp_path."""
import csv
import json

import pytest

from ftjax import data as data_lib
from ftjax.data import formats
from ftjax.errors import ConfigError, DataError, EnvironmentSetupError, MissingFileError, ModelError
from tests import tiny

JINJA_MISSING = ('apply_chat_template requires jinja2 to be installed. Please install it using '
                 '`pip install jinja2`.')
CHAT = [{'messages': [{'role': 'user', 'content': f'Hi {i}'}, {'role': 'assistant', 'content': f'Hello {i}.'}]}
        for i in range(8)]


@pytest.fixture(scope='module')
def tok():
    return tiny.make_tokenizer()


def make_cfg(tmp_path, path, **overrides):
    return tiny.data_config(tmp_path, path, **{'max_length': 64, **overrides})


def raises(exc_class, fn, *words):
    """fn() raises exactly `exc_class` (not a subclass of another kind) with one line holding `words`."""
    with pytest.raises(exc_class) as e:
        fn()
    msg = str(e.value)
    assert '\n' not in msg, msg
    for w in words:
        assert str(w) in msg, f'{w!r} not in: {msg}'
    return msg


def both(tmp_path, tok, cfg, exc_class, *words, num_labels=None):
    """validate_data (no tokenizer, before the model) and build_dataset both stop with the same clear error."""
    raises(exc_class, lambda: data_lib.validate_data(cfg, num_labels=num_labels), *words)
    return raises(exc_class, lambda: data_lib.build_dataset(cfg, tok, num_labels=num_labels), *words)


# ---------------------------------------------------------------- paths

def test_missing_path_names_the_key(tok, tmp_path):
    both(tmp_path, tok, make_cfg(tmp_path, tmp_path / 'nope.jsonl'), MissingFileError, 'nope.jsonl',
         'does not exist', '--config.data.path')


def test_glob_matching_nothing(tok, tmp_path):
    both(tmp_path, tok, make_cfg(tmp_path, tmp_path / 'd' / '*.jsonl'), MissingFileError, 'no files match',
         '*.jsonl', '--config.data.path')


def test_missing_eval_path_names_eval_path(tok, tmp_path):
    path = tiny.write_jsonl(tmp_path / 'train.jsonl', [{'prompt': 'a', 'completion': 'b'}])
    c = make_cfg(tmp_path, path, format='prompt_completion', eval_path=str(tmp_path / 'dev.jsonl'))
    raises(MissingFileError, lambda: data_lib.validate_data(c), 'dev.jsonl', '--config.data.eval_path')


def test_directory_without_a_train_file(tok, tmp_path):
    d = tmp_path / 'dir'
    d.mkdir()
    tiny.write_jsonl(d / 'dev.jsonl', [{'prompt': 'a', 'completion': 'b'}])
    both(tmp_path, tok, make_cfg(tmp_path, d, format='prompt_completion'), MissingFileError, str(d), "'train'",
         'train*', '--config.data.path')


def test_hub_names_are_not_fetched_by_validation(tmp_path):
    c = make_cfg(tmp_path, 'some-owner/some-dataset', format='text')
    assert data_lib.validate_data(c) == {'train': None}  # no network: checked when build_dataset loads it


# ---------------------------------------------------------------- files

@pytest.mark.parametrize('name,content', [('e.jsonl', ''), ('e.json', ''), ('e.csv', ''), ('e.txt', ''),
                                          ('blank.jsonl', '\n  \n\n'), ('bom_only.txt', '\ufeff')])
def test_empty_files(tok, tmp_path, name, content):
    (tmp_path / name).write_text(content, encoding='utf-8')
    both(tmp_path, tok, make_cfg(tmp_path, tmp_path / name, format='text'), DataError, name, 'empty' if not
         content else 'blank', 'point the data path at a file with examples')


def test_csv_with_a_header_and_no_rows(tok, tmp_path):
    (tmp_path / 'h.csv').write_text('prompt,completion\n')
    both(tmp_path, tok, make_cfg(tmp_path, tmp_path / 'h.csv', format='prompt_completion'), DataError, 'h.csv',
         'header but no rows')


def test_malformed_json_line_names_file_line_and_json_error(tok, tmp_path):
    path = tmp_path / 'm.jsonl'
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n'
                    '{"prompt": "e", completion: "f"}\n{"prompt": "g", "completion": "h"}\n')
    both(tmp_path, tok, make_cfg(tmp_path, path, format='prompt_completion'), DataError, str(path), 'line 3',
         'column 17', 'invalid JSON', 'Expecting property name', 'fix or remove line 3')


def test_truncated_json_list_names_line_and_column(tok, tmp_path):
    path = tmp_path / 'l.json'
    path.write_text('[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "c", "completion": \n')
    both(tmp_path, tok, make_cfg(tmp_path, path, format='prompt_completion'), DataError, str(path), 'line 4',
         'invalid JSON')


def test_non_utf8_byte_names_file_line_and_offset(tok, tmp_path):
    path = tmp_path / 'latin1.jsonl'
    good = b'{"prompt": "a", "completion": "b"}\n'
    path.write_bytes(good + good + '{"prompt": "caf\xe9", "completion": "x"}\n'.encode('latin-1'))
    offset = 2 * len(good) + len(b'{"prompt": "caf')
    both(tmp_path, tok, make_cfg(tmp_path, path, format='prompt_completion'), DataError, str(path), 'line 3',
         f'byte offset {offset}', '0xe9', 'not UTF-8', 're-encode the file as UTF-8')


def test_non_utf8_csv_past_the_first_chunk(tok, tmp_path, monkeypatch):
    from ftjax.data import files
    monkeypatch.setattr(files, 'CHUNK', 7)  # multi-byte characters split across reads are not errors
    path = tmp_path / 'c.csv'
    path.write_bytes('prompt,completion\nh\u00e9llo \u20ac,b\n'.encode() + b'x\xff,y\n')
    both(tmp_path, tok, make_cfg(tmp_path, path, format='prompt_completion'), DataError, 'line 3', 'not UTF-8')


@pytest.mark.parametrize('content,words', [
    ('[1, 2, 3]', ['holds numbers', 'not objects']),
    ('["a", "b"]', ['holds strings', 'not objects']),
    ('[]', ['JSON list is empty']),
    ('"just a string"', ['not a JSON object', 'list of objects']),
    ('{"prompt": "a", "completion": "b"}\n[1, 2]\n', ['line 2 is a JSON array, not an object']),
    ('[{"prompt": "a", "completion": "b"}, 7]', ['item 1 (0-based)', 'is a number, not an object']),
])
def test_json_that_is_not_a_list_of_objects(tok, tmp_path, content, words):
    path = tmp_path / 'x.json'
    path.write_text(content)
    both(tmp_path, tok, make_cfg(tmp_path, path, format='prompt_completion'), DataError, str(path), *words)


def test_records_nested_under_a_key_are_pointed_out(tok, tmp_path):
    path = tmp_path / 'n.json'
    path.write_text(json.dumps({'data': [{'prompt': 'a', 'completion': 'b'}]}))
    both(tmp_path, tok, make_cfg(tmp_path, path, format='prompt_completion'), DataError, "nested under 'data'",
         '--config.data.fields.prompt=COLUMN')


def test_csv_first_row_with_extra_fields_is_not_silently_an_index(tok, tmp_path):
    path = tmp_path / 'x.csv'
    path.write_text('prompt,completion\nhello, world,bye\n')  # pandas would make 'hello' an index
    both(tmp_path, tok, make_cfg(tmp_path, path, format='prompt_completion'), DataError, str(path), 'line 2',
         '3 fields', 'header has 2', 'quote fields')


def test_csv_later_row_with_extra_fields(tok, tmp_path):
    path = tmp_path / 'x.csv'
    with open(path, 'w', newline='') as f:
        csv.writer(f).writerows([['prompt', 'completion'], ['a', 'b'], ['c', 'd'], ['e', 'f', 'g']])
    both(tmp_path, tok, make_cfg(tmp_path, path, format='prompt_completion'), DataError, 'line 4', '3 fields')


def test_tsv_with_a_tab_inside_a_sentence(tok, tmp_path):
    path = tmp_path / 'train.tsv'
    path.write_text('label\tsentence\n1\tgood\n0\tbad\tworse\n')
    both(tmp_path, tok, make_cfg(tmp_path, path, format='classification', fields={'text': 'sentence'}), DataError,
         'line 3', 'TSV file has no quoting')


def test_bom_at_file_start_is_fine(tok, tmp_path):
    (tmp_path / 'b.jsonl').write_text('\ufeff' + json.dumps({'prompt': 'a', 'completion': 'b'}) + '\n',
                                      encoding='utf-8')
    (tmp_path / 'b.csv').write_text('\ufeffprompt,completion\na,b\n', encoding='utf-8')
    (tmp_path / 'b.txt').write_text('\ufeffhello world', encoding='utf-8')
    for name, fmt in (('b.jsonl', 'prompt_completion'), ('b.csv', 'prompt_completion'), ('b.txt', 'text')):
        c = make_cfg(tmp_path, tmp_path / name, format=fmt, text_chunking=False)
        assert data_lib.validate_data(c) == {'train': 1}
        data = data_lib.build_dataset(c, tok)
        assert data.num_examples == 1 and tok.decode(data.tokens).count('\ufeff') == 0


def test_files_of_a_glob_with_different_columns(tok, tmp_path):
    tiny.write_jsonl(tmp_path / 'a.jsonl', [{'prompt': 'a', 'completion': 'b'}])
    tiny.write_jsonl(tmp_path / 'b.jsonl', [{'question': 'a', 'answer': 'b'}])
    both(tmp_path, tok, make_cfg(tmp_path, tmp_path / '*.jsonl', format='prompt_completion'), DataError, 'b.jsonl',
         "['question', 'answer']", 'same columns')


# ---------------------------------------------------------------- columns and rows

def test_missing_column_names_column_available_ones_and_key(tok, tmp_path):
    path = tmp_path / 'd.csv'
    path.write_text('question,answer\nq,a\n')
    both(tmp_path, tok, make_cfg(tmp_path, path, format='prompt_completion', on_bad_row='skip'), DataError,
         str(path), "field 'prompt' needs column 'prompt'", "['question', 'answer']",
         '--config.data.fields.prompt=COLUMN')


def test_text_column_that_is_a_number(tok, tmp_path):
    path = tiny.write_jsonl(tmp_path / 'c.jsonl', [{'text': 'fine', 'label': 0}, {'text': 42, 'label': 1}])
    msg = raises(DataError, lambda: data_lib.build_dataset(make_cfg(tmp_path, path, format='classification'), tok),
                 str(path), 'row 1:', "field 'text'", 'not a string', '--config.data.fields.text=COLUMN',
                 'on_bad_row=skip')
    assert '1 of 2 rows' in msg


@pytest.mark.parametrize('rows,over,words', [
    ([{'text': 'a', 'label': 0}, {'text': 'b', 'label': 1}, {'text': 'c', 'label': 2}], {'num_labels': 2},
     ['row 2:', '2 is outside the label set', 'class ids 0..1', 'data.num_labels=2']),
    ([{'text': 'a', 'label': 'pos'}, {'text': 'b', 'label': 'neutral'}], {'label_names': ['neg', 'pos']},
     ['row 1:', "'neutral' is not in data.label_names=['neg', 'pos']"]),
    ([{'text': 'a', 'label': 0}, {'text': 'b', 'label': -1}], {},
     ['row 1:', '-1 is outside the label set']),
    ([{'text': 'a', 'label': 1}, {'text': 'b', 'label': 3}], {'label_names': ['neg', 'pos']},
     ['row 1:', '3 is outside the label set', "data.label_names=['neg', 'pos']"]),
    ([{'text': 'a', 'label': 1}, {'text': 'b', 'label': 1.5}], {},
     ['row 1:', 'is a float', 'not an integer class id']),
])
def test_label_outside_the_label_set(tok, tmp_path, rows, over, words):
    path = tiny.write_jsonl(tmp_path / 'c.jsonl', rows)
    both(tmp_path, tok, make_cfg(tmp_path, path, format='classification', **over), DataError, str(path),
         "field 'label'", '--config.data.label_names', '--config.data.num_labels', *words)


def test_label_past_the_model_classifier(tok, tmp_path):
    """No label set in data.*: the model's num_labels is the set (a label past it would train to NaN)."""
    path = tiny.write_jsonl(tmp_path / 'c.jsonl', [{'text': 'a', 'label': 0}, {'text': 'b', 'label': 1},
                                                    {'text': 'c', 'label': 2}])
    c = make_cfg(tmp_path, path, format='classification')
    assert data_lib.build_dataset(c, tok).stats['num_labels'] == 3  # unknown classifier: inferred, as before
    both(tmp_path, tok, c, DataError, 'row 2:', "the model's num_labels=2", 'class ids 0..1', num_labels=2)
    c.on_bad_row, c.max_bad_fraction = 'skip', 0.5
    assert data_lib.validate_data(c, num_labels=2) == {'train': 3}
    data = data_lib.build_dataset(c, tok, num_labels=2)
    assert data.stats['num_bad'] == 1 and sorted(data.labels.tolist()) == [0, 1] and data.stats['num_labels'] == 2


def test_label_set_larger_than_the_classifier_is_a_config_error(tok, tmp_path):
    path = tiny.write_jsonl(tmp_path / 'c.jsonl', [{'text': 'a', 'label': 'x'}])
    c = make_cfg(tmp_path, path, format='classification', label_names=['x', 'y', 'z'])
    both(tmp_path, tok, c, ConfigError, 'data.label_names', '3 classes', "model's classifier has 2",
         'model.num_labels', num_labels=2)
    c = make_cfg(tmp_path, path, format='classification', label_names=['x', 'y', 'z'], num_labels=2)
    both(tmp_path, tok, c, ConfigError, 'label_names has 3 names', 'num_labels=2')


def test_bad_labels_under_skip_are_counted_once_validation_passes(tok, tmp_path):
    rows = [{'text': f't{i}', 'label': i % 2} for i in range(30)] + [{'text': 'odd', 'label': 'meh'}]
    path = tiny.write_jsonl(tmp_path / 'c.jsonl', rows)
    c = make_cfg(tmp_path, path, format='classification', on_bad_row='skip', max_bad_fraction=0.1)
    assert data_lib.validate_data(c) == {'train': 31}
    c.max_bad_fraction = 0.01
    raises(DataError, lambda: data_lib.validate_data(c), '1 of 31 rows', 'data.max_bad_fraction=0.01', 'row 30:')


# ---------------------------------------------------------------- the environment is not the data

class FlakyTemplate:
    """tok.apply_chat_template that raises `error` for the first `times` calls (or while `when(messages)`)."""

    def __init__(self, tok, error, times=None, when=None):
        self.real, self.error, self.times, self.when, self.calls = tok.apply_chat_template, error, times, when, 0

    def __call__(self, messages, *args, **kwargs):
        self.calls += 1
        if (self.times is not None and self.calls <= self.times) or (self.when is not None and self.when(messages)):
            raise self.error
        return self.real(messages, *args, **kwargs)


@pytest.mark.parametrize('policy', ['error', 'skip'])
def test_missing_jinja2_is_an_environment_error_not_a_bad_row(tok, tmp_path, monkeypatch, policy):
    calls = []
    real = formats.FORMATS['chat']
    monkeypatch.setitem(formats.FORMATS, 'chat', lambda row, info, opts: calls.append(1) or real(row, info, opts))
    path = tiny.write_jsonl(tmp_path / 'chat.jsonl', CHAT)
    c = make_cfg(tmp_path, path, format='chat', on_bad_row=policy, max_bad_fraction=1.0)
    flaky = FlakyTemplate(tok, ImportError(JINJA_MISSING), times=1)
    monkeypatch.setattr(tok, 'apply_chat_template', flaky)
    msg = raises(EnvironmentSetupError, lambda: data_lib.build_dataset(c, tok), 'jinja2', "pip install 'jinja2'",
                 'not a fault of the data')
    assert 'row' not in msg and 'bad' not in msg and flaky.calls == 1 and not calls  # at once: no row was mapped
    data = data_lib.build_dataset(c, tok)  # jinja2 'installed': nothing of the failure was cached
    assert data.stats['num_bad'] == 0 and data.num_examples == len(CHAT) and len(calls) == len(CHAT)


def test_import_error_while_mapping_rows_stops_even_with_skip(tok, tmp_path, monkeypatch):
    path = tiny.write_jsonl(tmp_path / 'chat.jsonl', CHAT)
    c = make_cfg(tmp_path, path, format='chat', on_bad_row='skip', max_bad_fraction=1.0)
    broken = ModuleNotFoundError('No module named sentencepiece', name='sentencepiece')
    monkeypatch.setattr(tok, 'apply_chat_template',
                        FlakyTemplate(tok, broken, when=lambda m: any('Hi 3' in x['content'] for x in m)))
    raises(EnvironmentSetupError, lambda: data_lib.build_dataset(c, tok), "pip install 'sentencepiece'",
           'tokenising (chat)')
    monkeypatch.undo()
    assert data_lib.build_dataset(c, tok).stats['num_bad'] == 0


def test_a_cached_bad_row_verdict_is_checked_again(tok, tmp_path, monkeypatch):
    """A verdict that came from the environment (here: a template refusing rows it later accepts) is not reused."""
    from jinja2.exceptions import TemplateError
    path = tiny.write_jsonl(tmp_path / 'chat.jsonl', CHAT)
    c = make_cfg(tmp_path, path, format='chat', on_bad_row='skip', max_bad_fraction=0.5)
    row_5 = lambda m: any('Hi 5' in x['content'] for x in m)  # noqa: E731
    monkeypatch.setattr(tok, 'apply_chat_template', FlakyTemplate(tok, TemplateError('flaky'), when=row_5))
    assert data_lib.build_dataset(c, tok).stats['num_bad'] == 1  # a row fault as far as anyone can tell
    monkeypatch.undo()
    calls = []
    real = formats.FORMATS['chat']
    monkeypatch.setitem(formats.FORMATS, 'chat', lambda row, info, opts: calls.append(1) or real(row, info, opts))
    data = data_lib.build_dataset(c, tok)  # same cache key; the stale verdict is found and all is retokenised
    assert data.stats['num_bad'] == 0 and data.num_examples == len(CHAT) and len(calls) == 1 + len(CHAT)
    calls.clear()
    assert data_lib.build_dataset(c, tok).stats['num_bad'] == 0 and not calls  # and the fresh result is cached


def test_cache_key_covers_library_versions_and_bad_row_policy(tok, tmp_path, monkeypatch):
    calls = []
    real = formats.FORMATS['prompt_completion']
    monkeypatch.setitem(formats.FORMATS, 'prompt_completion',
                        lambda row, info, opts: calls.append(1) or real(row, info, opts))
    path = tiny.write_jsonl(tmp_path / 'pc.jsonl', [{'prompt': f'p{i}', 'completion': f'c{i}'} for i in range(4)])
    c = make_cfg(tmp_path, path, format='prompt_completion')
    data_lib.build_dataset(c, tok)
    data_lib.build_dataset(c, tok)
    assert len(calls) == 4  # cached
    versions = formats.library_versions()
    assert set(versions) == {'transformers', 'tokenizers', 'datasets', 'jinja2', 'ftjax'} and versions['jinja2']
    monkeypatch.setattr(formats, 'library_versions', lambda: {**versions, 'jinja2': '9.9'})
    data_lib.build_dataset(c, tok)
    assert len(calls) == 8  # another jinja2: tokenised again
    c.on_bad_row = 'skip'
    data_lib.build_dataset(c, tok)
    assert len(calls) == 12
    other = tiny.make_tokenizer()
    other.chat_template = tiny.CHATML_TEMPLATE.replace('<|im_start|>', '<|im_start|> ')
    assert other.chat_template != tok.chat_template
    data_lib.build_dataset(c, other)
    assert len(calls) == 16  # another chat template


def test_tokenizer_without_a_chat_template(tmp_path):
    plain = tiny.make_tokenizer()
    plain.chat_template = None
    path = tiny.write_jsonl(tmp_path / 'chat.jsonl', CHAT)
    raises(ModelError, lambda: data_lib.build_dataset(make_cfg(tmp_path, path, format='chat'), plain),
           'no chat template', 'data.format=prompt_completion')


def test_chat_template_that_does_not_compile(tmp_path):
    broken = tiny.make_tokenizer()
    broken.chat_template = '{% for m in messages %}{{ m.content }'
    path = tiny.write_jsonl(tmp_path / 'chat.jsonl', CHAT)
    raises(ModelError, lambda: data_lib.build_dataset(make_cfg(tmp_path, path, format='chat', on_bad_row='skip'),
                                                      broken), 'does not compile', 'chat_template')


def test_template_refusing_a_conversations_content_is_still_a_bad_row(tok, tmp_path):
    strict = tiny.make_tokenizer()
    strict.chat_template = ("{% for m in messages %}{% if m['content'] == 'forbidden' %}"
                            "{{ raise_exception('no forbidden words') }}{% endif %}{% endfor %}" + tiny.CHATML_TEMPLATE)
    rows = CHAT + [{'messages': [{'role': 'user', 'content': 'forbidden'}, {'role': 'assistant', 'content': 'x'}]}]
    path = tiny.write_jsonl(tmp_path / 'chat.jsonl', rows)
    raises(DataError, lambda: data_lib.build_dataset(make_cfg(tmp_path, path, format='chat'), strict),
           'row 8:', "field 'messages'", 'refused this conversation: no forbidden words', 'on_bad_row=skip')
    data = data_lib.build_dataset(make_cfg(tmp_path, path, format='chat', on_bad_row='skip', max_bad_fraction=0.2),
                                  strict)
    assert data.stats['num_bad'] == 1 and data.num_examples == len(CHAT)
