"""Chat templates: the model's own, its family's published turn format, or one named in `data.chat_template`.

A base model often ships without a chat template (the Gemma 3 270M GGUF has no `tokenizer.chat_template`),
yet chat-format data and `ftjax.generate --chat` need one. `apply` gives the tokenizer:

  data.chat_template=None     the model's own template; if it has none, its family's published format
                              (FAMILY_TEMPLATES, by HF model_type), with one log line saying so
  data.chat_template='gemma'  a named format (TEMPLATES: gemma, chatml, llama3), for any model
  data.chat_template='{% for m in messages %}...'   a Jinja template of your own

The formats are the ones the model families publish in their tokenizer_config.json (Gemma's without its
image branch); the tokenizer then renders, saves (export) and fingerprints (data cache) that template.
"""
import logging

from ftjax.config_checks import CHAT_FORMATS
from ftjax.errors import ConfigError

GEMMA = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}")
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
TEMPLATES = dict(zip(CHAT_FORMATS, (GEMMA, CHATML, LLAMA3)))  # name -> Jinja
# HF model_type -> the published format a model of that family gets when its tokenizer has no template
FAMILY_TEMPLATES = {'gemma': 'gemma', 'gemma2': 'gemma', 'gemma3': 'gemma', 'gemma3_text': 'gemma',
                    'qwen2': 'chatml', 'qwen3': 'chatml'}


def resolve(value, key='data.chat_template'):
    """A named format or a Jinja string -> the Jinja string (None stays None)."""
    if value is None or value in TEMPLATES:
        return TEMPLATES.get(value)
    if isinstance(value, str) and ('{{' in value or '{%' in value):
        return value
    raise ConfigError(f"{key}={value!r} is neither a known chat format ({', '.join(TEMPLATES)}) nor a Jinja "
                      f"template (one with {{{{ ... }}}} / {{% ... %}}); pass one of those, or None for the "
                      f"model's own.")


def apply(tokenizer, model_type, value=None, source='the model'):
    """Sets `tokenizer.chat_template` as the module docstring says; returns the name of the format used
    ('model', a TEMPLATES name, 'custom', or None when there is none)."""
    if tokenizer is None:
        return None
    template = resolve(value)
    if template is not None:
        tokenizer.chat_template = template
        return value if value in TEMPLATES else 'custom'
    if getattr(tokenizer, 'chat_template', None):
        return 'model'
    family = FAMILY_TEMPLATES.get(model_type)
    if family is None:
        return None
    tokenizer.chat_template = TEMPLATES[family]
    logging.info("%s has no chat template: chat data and --chat use the %s family's published turn format "
                 "(%r; set data.chat_template to change it).", source, model_type, family)
    return family
