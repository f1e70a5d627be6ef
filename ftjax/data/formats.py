"""Formats: one function per data format, from a raw example (a dict of columns) to tokens.

LM formats return {'input_ids': [n], 'answer_mask': [n]}: answer_mask[i] = 1 when token i is an
answer token to learn (unshifted; `packing.take_rows` shifts, so loss_mask[t] = answer_mask[t + 1]).
  alpaca             [prefix] prompt_template(instruction, input) | output [EOS]
  prompt_completion  [prefix] prompt + prompt_separator           | completion [EOS]
  chat               the chat template; assistant content and its end-of-turn token
  text               [prefix] text [EOS], all tokens
  preference         prompt | chosen, then prompt | rejected, back to back: input_ids and answer_mask of
                     both sequences and `pair_split` (the chosen sequence's length); the prompt is
                     text (rendered as prompt_completion, or a user turn with use_chat_template) or a
                     list of messages (the chat template; only the final answer is learned)
(| marks where the answer starts; [prefix] is what the tokenizer puts before a text, e.g. BOS
for Llama and nothing for GPT-2-style BPE; prompt and answer are tokenised separately.)
`classification` returns {'input_ids', 'token_type_ids', 'label'} (special tokens included).
Column names come from `data.fields` ('a|b': column a, or b where a is absent); a row that cannot
be used raises BadRow(field, reason). A label must be in the label set: data.label_names,
data.num_labels, and the model's classifier size when the caller passes it (a label past the
classifier would train to NaN); `label_set` checks that these agree.
"""
import dataclasses
import hashlib
import importlib.metadata
import json
import re

from ftjax.data.bad_rows import BadRow, environment_error
from ftjax.data.chat import chat_tokens, check_template, normalise_messages
from ftjax.errors import ConfigError

VERSION = 3  # bump when tokenisation changes, so cached tokens are not reused
LIBRARIES = ('transformers', 'tokenizers', 'datasets', 'jinja2', 'ftjax')  # their versions key the cache


@dataclasses.dataclass
class Options:
    """The parts of the data config that tokenisation depends on (its cache fingerprint)."""
    format: str
    fields: dict
    prompt_template: str
    prompt_template_no_input: object
    prompt_separator: str
    use_chat_template: bool
    add_eos: bool
    label_names: object  # list of str or None
    num_labels: object  # int or None
    max_length: int  # classification only: its tokens are truncated while tokenising
    truncation: str  # classification only
    label_source: str = ''  # classification: what sets num_labels, for messages ('data.num_labels=3', ...)
    on_bad_row: str = 'error'  # not used by tokenisation, but part of the cache key: a verdict is per policy

    @classmethod
    def from_config(cls, cfg, num_labels=None):
        """num_labels: the model's classifier size, when known (labels must be below it)."""
        cls_only = cfg.format == 'classification'
        n, source = label_set(cfg, num_labels) if cls_only else (cfg.num_labels, '')
        return cls(cfg.format, dict(cfg.fields), cfg.prompt_template, cfg.prompt_template_no_input,
                   cfg.prompt_separator or '', bool(cfg.use_chat_template), bool(cfg.add_eos),
                   list(cfg.label_names) if cfg.label_names else None, n,
                   cfg.max_length if cls_only else 0, cfg.truncation if cls_only else '', source,
                   str(cfg.on_bad_row))


def label_set(cfg, model_num_labels=None):
    """(number of classes, what sets it) of a classification config; (None, '') when nothing does.

    data.num_labels, else len(data.label_names), else the model's classifier size; a declared set
    larger than the classifier, or more names than data.num_labels, is a ConfigError.
    """
    names = list(cfg.label_names) if cfg.label_names else None
    if names and cfg.num_labels and len(names) > cfg.num_labels:
        raise ConfigError(f'config.data.label_names has {len(names)} names but config.data.num_labels='
                          f'{cfg.num_labels}; make them agree (or leave num_labels unset).')
    if cfg.num_labels:
        n, source = int(cfg.num_labels), f'data.num_labels={cfg.num_labels}'
    elif names:
        n, source = len(names), f'data.label_names={names}'
    else:
        n, source = None, ''
    if model_num_labels:
        if n is not None and n > model_num_labels:
            raise ConfigError(f"{source} gives {n} classes but the model's classifier has {model_num_labels} "
                              f'(model.num_labels); make them agree.')
        if n is None:
            n, source = int(model_num_labels), f"the model's num_labels={model_num_labels}"
    return n, source


def check_tokenizer(info, opts):
    """Once before any row: what would otherwise fail every row for a reason that is not the rows'."""
    if opts.format == 'chat' or (opts.use_chat_template and opts.format in ('alpaca', 'prompt_completion',
                                                                            'preference')):
        check_template(info)


def library_versions():
    """{package: version or None} of the libraries tokenisation depends on."""
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


@dataclasses.dataclass
class TokenizerInfo:
    tokenizer: object
    prefix: list  # special tokens the tokenizer puts before a text ([bos] for Llama, [] for GPT-2 BPE)
    eos_id: object
    pad_id: int
    special_ids: frozenset


def tokenizer_info(tok):
    try:
        full = list(tok('a')['input_ids'])
        bare = list(tok('a', add_special_tokens=False)['input_ids'])
    except (ImportError, MemoryError) as e:  # e.g. a slow tokenizer without sentencepiece
        raise environment_error(e, 'data: running the tokenizer') from e
    k = next((i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare), 0)
    special = set(tok.all_special_ids)
    special |= {i for i, t in getattr(tok, 'added_tokens_decoder', {}).items() if getattr(t, 'special', False)}
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return TokenizerInfo(tok, full[:k], tok.eos_token_id, 0 if pad is None else int(pad), frozenset(special))


def fingerprint(source_fingerprint, opts, tok):
    """Changes with the raw data, the options, the tokenizer, its chat template, the libraries and VERSION."""
    backend = getattr(tok, 'backend_tokenizer', None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    ident = [VERSION, source_fingerprint, dataclasses.asdict(opts), type(tok).__name__,
             hashlib.sha256(vocab.encode()).hexdigest(), getattr(tok, 'chat_template', None),
             tok.all_special_tokens, tok.truncation_side, library_versions()]
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:24]


def get_text(row, fields, role, required=True, allow_empty=False):
    column = fields.get(role) or role
    value = row.get(column)
    if value is None:
        if not required:
            return ''
        raise BadRow(role, 'is missing' + (f" (no column '{column}')" if column not in row else ' (None)'))
    if not isinstance(value, str):
        raise BadRow(role, f'is a {type(value).__name__}, not a string: {str(value)[:60]!r}')
    if not allow_empty and not value.strip():
        raise BadRow(role, 'is empty')
    return value


def encode(info, text):
    return list(info.tokenizer(text, add_special_tokens=False)['input_ids']) if text else []


def prompt_answer(info, opts, prompt, answer):
    if opts.use_chat_template:
        return chat_tokens(info, [{'role': 'user', 'content': prompt}, {'role': 'assistant', 'content': answer}])
    p = info.prefix + encode(info, prompt)
    a = encode(info, answer) + ([info.eos_id] if opts.add_eos and info.eos_id is not None else [])
    return {'input_ids': p + a, 'answer_mask': [0] * len(p) + [1] * len(a)}


def fill_template(template, values):
    """Replaces {instruction} / {input} in one pass (other braces, e.g. JSON, are left alone)."""
    return re.sub(r'\{(instruction|input)\}', lambda m: values[m.group(1)], template)


def alpaca_parts(row, opts):
    """(prompt text, answer) of an alpaca row: the template filled with instruction and input."""
    instruction = get_text(row, opts.fields, 'instruction')
    inp = get_text(row, opts.fields, 'input', required=False, allow_empty=True)
    output = get_text(row, opts.fields, 'output')
    template = opts.prompt_template if inp.strip() or not opts.prompt_template_no_input \
        else opts.prompt_template_no_input
    return fill_template(template, {'instruction': instruction, 'input': inp}), output


def prompt_completion_parts(row, opts):
    """(prompt text, answer); the separator only joins raw text (a chat template has its own)."""
    prompt = get_text(row, opts.fields, 'prompt', allow_empty=True)
    completion = get_text(row, opts.fields, 'completion')
    return (prompt if opts.use_chat_template else prompt + opts.prompt_separator), completion


def alpaca(row, info, opts):
    return prompt_answer(info, opts, *alpaca_parts(row, opts))


def prompt_completion(row, info, opts):
    return prompt_answer(info, opts, *prompt_completion_parts(row, opts))


def _answer_text(row, opts, role):
    """A preference answer: a string, or (TRL's conversational form) a list of messages, the last one's content."""
    value = row.get(opts.fields.get(role) or role)
    if isinstance(value, (list, tuple)) and value:
        last = value[-1]
        keys = opts.fields['content'].split('|')
        value = next((last[k] for k in keys if isinstance(last, dict) and k in last), None)
        return get_text({role: value}, {}, role)
    return get_text(row, opts.fields, role)


def _last_answer_only(tokens):
    """Keeps the answer mask of the last assistant turn only (earlier turns of a message prompt are context)."""
    mask = list(tokens['answer_mask'])
    end = max((i for i, m in enumerate(mask) if m), default=-1)
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return {'input_ids': tokens['input_ids'], 'answer_mask': [int(start <= i <= end) for i in range(len(mask))]}


def preference_parts(row, opts):
    """(prompt: text or message list, chosen, rejected) of a preference row, or BadRow."""
    column = opts.fields.get('prompt') or 'prompt'
    prompt = row.get(column)
    if isinstance(prompt, (list, tuple)):
        if not prompt:
            raise BadRow('prompt', 'is an empty list of messages')
        try:
            msgs = normalise_messages(list(prompt) + [{'role': 'assistant', 'content': 'x'}], opts.fields)[:-1]
        except BadRow as e:
            raise BadRow('prompt', e.reason) from e
        if not any(m['content'].strip() for m in msgs):
            raise BadRow('prompt', 'is empty')
    else:
        msgs = None
        prompt = get_text(row, opts.fields, 'prompt')
    chosen, rejected = _answer_text(row, opts, 'chosen'), _answer_text(row, opts, 'rejected')
    if chosen.strip() == rejected.strip():
        raise BadRow('rejected', 'is identical to chosen (no preference to learn)')
    return (msgs if msgs is not None else prompt), chosen, rejected


def preference_sequence(info, opts, prompt, answer):
    if isinstance(prompt, list):
        return _last_answer_only(chat_tokens(info, prompt + [{'role': 'assistant', 'content': answer}]))
    return prompt_answer(info, opts, prompt if opts.use_chat_template else prompt + opts.prompt_separator, answer)


def preference(row, info, opts):
    prompt, chosen, rejected = preference_parts(row, opts)
    a, b = (preference_sequence(info, opts, prompt, x) for x in (chosen, rejected))
    return {'input_ids': a['input_ids'] + b['input_ids'], 'answer_mask': a['answer_mask'] + b['answer_mask'],
            'pair_split': len(a['input_ids'])}


def chat(row, info, opts):
    return chat_tokens(info, normalise_messages(row.get(opts.fields['messages']), opts.fields))


def text(row, info, opts):
    """Plain language modelling; an empty text gives no tokens (dropped, not a bad row: blank lines)."""
    t = get_text(row, opts.fields, 'text', allow_empty=True)
    if not t.strip():
        return {'input_ids': [], 'answer_mask': []}
    ids = info.prefix + encode(info, t) + ([info.eos_id] if opts.add_eos and info.eos_id is not None else [])
    return {'input_ids': ids, 'answer_mask': [1] * len(ids)}


def parse_label(value, opts):
    """A raw label -> its class id: a name of data.label_names, or an integer in the label set."""
    names, n = opts.label_names, opts.num_labels
    if value is None:
        raise BadRow('label', 'is missing (None)')
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        s = value.strip()
        if names and s in names:
            value = names.index(s)
        elif not re.fullmatch(r'-?\d+', s):
            raise BadRow('label', f'{value!r} is not in data.label_names={names}' if names else
                         f'{value!r} is not an integer class id; set data.label_names to map string labels')
        else:
            value = int(s)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRow('label', f'is a {type(value).__name__} ({str(value)[:40]!r}), not an integer class id or a '
                              'name of data.label_names')
    if value < 0 or (n is not None and value >= n):
        allowed = f'0..{n - 1}' if n else '0, 1, ...'
        raise BadRow('label', f'{value} is outside the label set (class ids {allowed}'
                              + (f' from {opts.label_source})' if opts.label_source else ')'))
    return int(value)


def classification(row, info, opts):
    a = get_text(row, opts.fields, 'text')
    b = get_text(row, opts.fields, 'text_pair') if opts.fields['text_pair'] else None
    label = parse_label(row.get(opts.fields['label']), opts)
    tok = info.tokenizer
    cut = opts.truncation != 'drop'
    side, tok.truncation_side = tok.truncation_side, 'left' if opts.truncation == 'left' else 'right'
    try:
        enc = tok(a, b, truncation=cut, max_length=opts.max_length if cut else None, return_token_type_ids=True)
    finally:
        tok.truncation_side = side
    ids = list(enc['input_ids'])
    types = list(enc.get('token_type_ids') or [0] * len(ids))
    truncated = bool(cut and enc.encodings and enc.encodings[0].overflowing)  # fast tokenizers report it
    return {'input_ids': ids, 'token_type_ids': types, 'label': label, 'truncated': int(truncated)}


def prompt_and_answer(row, cfg):
    """(prompt, reference answer) of a raw example, formatted exactly as training formats it (generation eval).

    The prompt is a message list when training renders it with the chat template (format chat, or
    use_chat_template: generate with the chat template), else the prompt string (generate from it as is;
    the tokenizer's prefix, e.g. BOS, goes first). `cfg` is the data config. Raises BadRow like training.
    """
    opts = resolve_fields(cfg if isinstance(cfg, Options) else Options.from_config(cfg), list(row))
    if opts.format == 'chat':
        msgs = normalise_messages(row.get(opts.fields['messages']), opts.fields)
        last = max(i for i, m in enumerate(msgs) if m['role'] == 'assistant')
        return msgs[:last], msgs[last]['content']
    if opts.format == 'preference':  # the chosen answer is the reference
        prompt, chosen, _ = preference_parts(row, opts)
        if isinstance(prompt, list):
            return prompt, chosen
        return ([{'role': 'user', 'content': prompt}] if opts.use_chat_template else
                prompt + opts.prompt_separator), chosen
    parts = {'alpaca': alpaca_parts, 'prompt_completion': prompt_completion_parts}.get(opts.format)
    if parts is None:
        raise ValueError(f'data.format={opts.format!r} has no prompt and answer to generate from.')
    prompt, answer = parts(row, opts)
    return ([{'role': 'user', 'content': prompt}] if opts.use_chat_template else prompt), answer


FORMATS = {'alpaca': alpaca, 'prompt_completion': prompt_completion, 'chat': chat, 'text': text,
           'classification': classification, 'preference': preference}


COLUMN_ROLES = ('instruction', 'input', 'output', 'messages', 'prompt', 'completion', 'text', 'text_pair', 'label',
                'chosen', 'rejected')


def resolve_fields(opts, columns):
    """Options whose column roles name real columns: 'sentence|content' -> the first one the data has."""
    fields = dict(opts.fields)
    for role in COLUMN_ROLES:
        spec = fields.get(role)
        if spec and '|' in spec:
            alternatives = spec.split('|')
            fields[role] = next((c for c in alternatives if c in columns), spec)
    return dataclasses.replace(opts, fields=fields)


def required_roles(opts):
    """Roles whose column must exist in the data (optional ones: alpaca's input)."""
    return {'alpaca': ['instruction', 'output'], 'prompt_completion': ['prompt', 'completion'],
            'chat': ['messages'], 'text': ['text'], 'preference': ['prompt', 'chosen', 'rejected'],
            'classification': ['text', 'label'] + (['text_pair'] if opts.fields['text_pair'] else [])
            }[opts.format]


def output_features(opts):
    import datasets
    ints = lambda dtype: datasets.List(datasets.Value(dtype))  # noqa: E731
    f = {'input_ids': ints('int32'), 'bad_field': datasets.Value('string'), 'bad_reason': datasets.Value('string')}
    if opts.format == 'classification':
        f.update(token_type_ids=ints('int8'), label=datasets.Value('int32'), truncated=datasets.Value('int8'))
    else:
        f.update(answer_mask=ints('int8'))
    if opts.format == 'preference':
        f.update(pair_split=datasets.Value('int32'))
    return datasets.Features(f)


def tokenize_batch(batch, info, opts):
    """datasets.map(batched=True) function: raw columns -> token columns (+ bad_field / bad_reason)."""
    fn = FORMATS[opts.format]
    columns = list(batch)
    n = len(batch[columns[0]]) if columns else 0
    lm = opts.format != 'classification'
    out = {k: [] for k in output_features(opts)}
    for i in range(n):
        row = {c: batch[c][i] for c in columns}
        try:
            ex, field, reason = fn(row, info, opts), '', ''
        except BadRow as e:
            ex = {'input_ids': [], 'answer_mask': [], 'token_type_ids': [], 'label': -1, 'truncated': 0,
                  'pair_split': 0}
            field, reason = e.field, e.reason
        except (ImportError, MemoryError) as e:  # not the row's fault: stop, whatever data.on_bad_row says
            raise environment_error(e, f'data: tokenising ({opts.format})') from e
        out['input_ids'].append(ex['input_ids'])
        out['bad_field'].append(field)
        out['bad_reason'].append(reason)
        if 'pair_split' in out:
            out['pair_split'].append(ex['pair_split'])
        if lm:
            out['answer_mask'].append(ex['answer_mask'])
        else:
            out['token_type_ids'].append(ex['token_type_ids'])
            out['label'].append(ex['label'])
            out['truncated'].append(ex['truncated'])
    return out
