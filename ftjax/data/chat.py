"""Chat conversations -> token ids and a per-token answer mask, through the tokenizer's chat template.

The assistant spans are found from the template itself, not by searching decoded text: for each
assistant turn i, render(messages[:i], add_generation_prompt=True) ends where the answer starts and
render(messages[:i+1]) ends where the turn ends. The full conversation is tokenised once, and the
tokens whose characters (offset mapping) fall in a span are the answer. A span is trimmed after
its last special token (the end-of-turn token, e.g. <|im_end|> / <|eot_id|> / <end_of_turn>), so
template whitespace after it is not learned. Both conditions are checked: a template whose
prompt is not a prefix of the full conversation (it rewrites earlier turns) is refused.

The template is the model's own, or the one `ftjax.data.templates.apply` gave its tokenizer when the run
loaded it (data.chat_template, else the family's published format, e.g. Gemma's for a base Gemma GGUF).

`check_template` renders two plain conversations once, before any row: when that fails, the fault is
the environment's (jinja2 missing: EnvironmentSetupError) or the tokenizer's (no template, a template
that does not compile or refuses everything: ModelError), never a row's. After it, only the errors a
template raises about a conversation's content (ROW_ERRORS) make a bad row; anything else propagates.
"""
from ftjax.config_checks import CHAT_FORMATS
from ftjax.data.bad_rows import BadRow, environment_error
from ftjax.errors import ModelError

try:  # transformers imports jinja2 only when a template is rendered; without it there is no TemplateError
    from jinja2.exceptions import TemplateError, TemplateSyntaxError
except ImportError:  # pragma: no cover - check_template reports the missing package
    TemplateError = TemplateSyntaxError = None

# what rendering one conversation raises about its content: the template's raise_exception() (roles that
# must alternate, an unsupported system message), or a value the template cannot handle
ROW_ERRORS = ((TemplateError,) if TemplateError else ()) + (TypeError, KeyError, IndexError, ValueError)
PROBES = ([{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello.'}],
          [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'},
           {'role': 'assistant', 'content': 'Hello.'}])

ROLE_ALIASES = {'human': 'user', 'gpt': 'assistant', 'bot': 'assistant', 'model': 'assistant'}  # ShareGPT etc.


def normalise_messages(raw, fields):
    """A raw `messages` cell -> [{'role', 'content'}], or BadRow naming what is wrong."""
    role_keys = fields['role'].split('|')
    content_keys = fields['content'].split('|')
    if raw is None:
        raise BadRow('messages', 'is missing (None)')
    if not isinstance(raw, (list, tuple)) or not raw:
        raise BadRow('messages', f'must be a non-empty list of messages, got {type(raw).__name__}')
    out = []
    for i, m in enumerate(raw):
        role_key = next((k for k in role_keys if isinstance(m, dict) and k in m), None)
        content_key = next((k for k in content_keys if isinstance(m, dict) and k in m), None)
        if role_key is None or content_key is None:
            raise BadRow('messages', f"message {i} is not a {{{'|'.join(role_keys)!r}, {'|'.join(content_keys)!r}}} "
                                     f'dict: {str(m)[:80]}')
        role, content = m[role_key], m[content_key]
        if not isinstance(role, str) or not isinstance(content, str):
            raise BadRow('messages', f'message {i}: role and content must be strings, got '
                                     f'{type(role).__name__} / {type(content).__name__}')
        role = ROLE_ALIASES.get(role, role)
        if role == 'assistant' and not content.strip():
            raise BadRow('messages', f'message {i} (assistant) has empty content')
        out.append({'role': role, 'content': content})
    if not any(m['role'] == 'assistant' for m in out):
        raise BadRow('messages', 'has no assistant message (nothing to learn)')
    return out


def render(tokenizer, messages, generation_prompt=False):
    if not messages and generation_prompt is False:
        return ''
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except ROW_ERRORS as e:  # e.g. roles that must alternate (ImportError, MemoryError, ... propagate)
        if TemplateSyntaxError and isinstance(e, TemplateSyntaxError):
            raise
        if not messages:
            return ''
        raise BadRow('messages', f'the chat template refused this conversation: {e}') from e


def check_template(info):
    """Renders and tokenises plain conversations once, before any row (see the module docstring)."""
    tok = info.tokenizer
    if not getattr(tok, 'is_fast', False):
        raise ModelError('data.format=chat (or data.use_chat_template) needs a fast (Rust) tokenizer, for its '
                         'offset mapping; this model has a slow one: use a model with tokenizer.json.')
    if not getattr(tok, 'chat_template', None):
        raise ModelError("the model's tokenizer has no chat template, which data.format=chat (or "
                         "data.use_chat_template) needs: set data.chat_template (a named format: "
                         f"{' | '.join(CHAT_FORMATS)}, or a Jinja template), use a chat model, or "
                         'data.format=prompt_completion.')
    refusals = []
    for messages in PROBES:
        try:
            chat_tokens(info, messages)
            return
        except ImportError as e:
            raise environment_error(e, 'data: rendering the chat template') from e
        except BadRow as e:
            refusals.append(e.reason)
        except Exception as e:
            if TemplateSyntaxError is None or not isinstance(e, TemplateSyntaxError):
                raise
            raise ModelError(f"the tokenizer's chat template does not compile ({' '.join(str(e).split())}); fix "
                             'chat_template in the model directory (tokenizer_config.json or chat_template.jinja).'
                             ) from e
    raise ModelError(f'the chat template refuses even a plain user/assistant conversation ({refusals[-1]}); '
                     'it is not the data: fix or replace the tokenizer\'s chat template.')


def assistant_char_spans(tokenizer, messages, text):
    """[(start, end)] character spans of the assistant turns in the rendered `text`."""
    spans = []
    for i, m in enumerate(messages):
        if m['role'] != 'assistant':
            continue
        before = render(tokenizer, messages[:i], generation_prompt=True)
        through = render(tokenizer, messages[:i + 1])
        if not (text.startswith(before) and text.startswith(through) and len(before) < len(through)):
            raise ModelError(
                'data.format=chat: this chat template does not render conversations incrementally (the prompt '
                f'of assistant turn {i} is not a prefix of the whole conversation), so the assistant tokens cannot '
                'be located. Use a template without history rewriting, or a prompt_completion data format.')
        spans.append((len(before), len(through)))
    return spans


def chat_tokens(info, messages):
    """{'input_ids', 'answer_mask'}: the answer mask is 1 on assistant content and its end-of-turn token."""
    tok = info.tokenizer
    text = render(tok, messages)
    spans = assistant_char_spans(tok, messages, text)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc['input_ids']), enc['offset_mapping']
    mask = [0] * len(ids)
    for s, e in spans:
        inside = [j for j, (a, b) in enumerate(offsets) if (a < e and b > s) or (a == b and s <= a < e)]
        ends = [j for j in inside if ids[j] in info.special_ids]
        if ends:  # trim template whitespace after the end-of-turn token
            inside = [j for j in inside if j <= ends[-1]]
        for j in inside:
            mask[j] = 1
    return {'input_ids': ids, 'answer_mask': mask}
