"""Formats: one function per data format, from a raw example (a dict of columns) to tokens.

LM formats return {'input_ids': [n], 'answer_mask': [n]}: answer_mask[i] = 1 when token i is an
answer token to learn (unshifted; `packing.take_rows` shifts, so loss_mask[t] = answer_mask[t + 1]).
  alpaca             [prefix] prompt_template(instruction, input) | output [EOS]
  prompt_completion  [prefix] prompt + prompt_separator           | completion [EOS]
  chat               the chat template; assistant content and its end-of-turn token
  text               [prefix] text [EOS], all tokens
(| marks where the answer starts; [prefix] is what the tokenizer puts before a text, e.g. BOS
for Llama and nothing for GPT-2-style BPE; prompt and answer are tokenised separately.)
`classification` returns {'input_ids', 'token_type_ids', 'label'} (special tokens included).
Column names come from `data.fields` ('a|b': column a, or b where a is absent); a row that cannot
be used raises BadRow(field, reason).
"""
import dataclasses
import hashlib
import json
import re

from ftjax.data.bad_rows import BadRow
from ftjax.data.chat import chat_tokens, normalise_messages

VERSION = 2  # bump when tokenisation changes, so cached tokens are not reused


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

    @classmethod
    def from_config(cls, cfg):
        cls_only = cfg.format == 'classification'
        return cls(cfg.format, dict(cfg.fields), cfg.prompt_template, cfg.prompt_template_no_input,
                   cfg.prompt_separator or '', bool(cfg.use_chat_template), bool(cfg.add_eos),
                   list(cfg.label_names) if cfg.label_names else None, cfg.num_labels,
                   cfg.max_length if cls_only else 0, cfg.truncation if cls_only else '')


@dataclasses.dataclass
class TokenizerInfo:
    tokenizer: object
    prefix: list  # special tokens the tokenizer puts before a text ([bos] for Llama, [] for GPT-2 BPE)
    eos_id: object
    pad_id: int
    special_ids: frozenset


def tokenizer_info(tok):
    full = list(tok('a')['input_ids'])
    bare = list(tok('a', add_special_tokens=False)['input_ids'])
    k = next((i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare), 0)
    special = set(tok.all_special_ids)
    special |= {i for i, t in getattr(tok, 'added_tokens_decoder', {}).items() if getattr(t, 'special', False)}
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return TokenizerInfo(tok, full[:k], tok.eos_token_id, 0 if pad is None else int(pad), frozenset(special))


def fingerprint(source_fingerprint, opts, tok):
    """Changes with the raw data, the tokenisation options, the tokenizer and VERSION."""
    backend = getattr(tok, 'backend_tokenizer', None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    ident = [VERSION, source_fingerprint, dataclasses.asdict(opts), type(tok).__name__,
             hashlib.sha256(vocab.encode()).hexdigest(), getattr(tok, 'chat_template', None),
             tok.all_special_tokens, tok.truncation_side]
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


def chat(row, info, opts):
    return chat_tokens(info, normalise_messages(row.get(opts.fields.get('messages')), opts.fields))


def text(row, info, opts):
    """Plain language modelling; an empty text gives no tokens (dropped, not a bad row: blank lines)."""
    t = get_text(row, opts.fields, 'text', allow_empty=True)
    if not t.strip():
        return {'input_ids': [], 'answer_mask': []}
    ids = info.prefix + encode(info, t) + ([info.eos_id] if opts.add_eos and info.eos_id is not None else [])
    return {'input_ids': ids, 'answer_mask': [1] * len(ids)}


def parse_label(value, opts):
    names, n = opts.label_names, opts.num_labels or (len(opts.label_names) if opts.label_names else None)
    if value is None:
        raise BadRow('label', 'is missing (None)')
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        s = value.strip()
        if names and s in names:
            return names.index(s)
        if not re.fullmatch(r'-?\d+', s):
            raise BadRow('label', f'{value!r} is not in data.label_names={names}' if names else
                         f'{value!r} is not an integer; set data.label_names to map string labels')
        value = int(s)
    if not isinstance(value, int):
        raise BadRow('label', f'is a {type(value).__name__} ({str(value)[:40]!r}), not an int or a string')
    if value < 0 or (n is not None and value >= n):
        raise BadRow('label', f'{value} is not a class id in [0, {n})' if n else f'{value} is negative')
    return int(value)


def classification(row, info, opts):
    a = get_text(row, opts.fields, 'text')
    b = get_text(row, opts.fields, 'text_pair') if opts.fields.get('text_pair') else None
    label = parse_label(row.get(opts.fields.get('label') or 'label'), opts)
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
        msgs = normalise_messages(row.get(opts.fields.get('messages')), opts.fields)
        last = max(i for i, m in enumerate(msgs) if m['role'] == 'assistant')
        return msgs[:last], msgs[last]['content']
    parts = {'alpaca': alpaca_parts, 'prompt_completion': prompt_completion_parts}.get(opts.format)
    if parts is None:
        raise ValueError(f'data.format={opts.format!r} has no prompt and answer to generate from.')
    prompt, answer = parts(row, opts)
    return ([{'role': 'user', 'content': prompt}] if opts.use_chat_template else prompt), answer


FORMATS = {'alpaca': alpaca, 'prompt_completion': prompt_completion, 'chat': chat, 'text': text,
           'classification': classification}


COLUMN_ROLES = ('instruction', 'input', 'output', 'messages', 'prompt', 'completion', 'text', 'text_pair', 'label')


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
            'chat': ['messages'], 'text': ['text'],
            'classification': ['text', 'label'] + (['text_pair'] if opts.fields.get('text_pair') else [])
            }[opts.format]


def output_features(opts):
    import datasets
    ints = lambda dtype: datasets.List(datasets.Value(dtype))  # noqa: E731
    f = {'input_ids': ints('int32'), 'bad_field': datasets.Value('string'), 'bad_reason': datasets.Value('string')}
    if opts.format == 'classification':
        f.update(token_type_ids=ints('int8'), label=datasets.Value('int32'), truncated=datasets.Value('int8'))
    else:
        f.update(answer_mask=ints('int8'))
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
            ex = {'input_ids': [], 'answer_mask': [], 'token_type_ids': [], 'label': -1, 'truncated': 0}
            field, reason = e.field, e.reason
        out['input_ids'].append(ex['input_ids'])
        out['bad_field'].append(field)
        out['bad_reason'].append(reason)
        if lm:
            out['answer_mask'].append(ex['answer_mask'])
        else:
            out['token_type_ids'].append(ex['token_type_ids'])
            out['label'].append(ex['label'])
            out['truncated'].append(ex['truncated'])
    return out
