"""The `data` part of the experiment config (`--config.data.KEY=VALUE`).

Key names are part of the command-line surface: add keys, rename none. `None` defaults are typed
placeholders, so `--config.data.eval_path=/x.jsonl` or `--config.data.num_labels=3` override them.
"""
import ml_collections
from ml_collections import config_dict

ALPACA_TEMPLATE = (
    'Below is an instruction that describes a task, paired with an input that provides further context. '
    'Write a response that appropriately completes the request.\n\n'
    '### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n')
ALPACA_TEMPLATE_NO_INPUT = (
    'Below is an instruction that describes a task. Write a response that appropriately completes the request.'
    '\n\n### Instruction:\n{instruction}\n\n### Response:\n')

FORMATS = ('alpaca', 'chat', 'prompt_completion', 'text', 'classification')
TRUNCATIONS = ('right', 'left', 'drop')
BAD_ROW_POLICIES = ('error', 'skip')


def default_fields():
    """Role -> column name. Map a user's columns here, e.g. `--config.data.fields.output=response`.

    'a|b' names alternatives: the first column the data has (e.g. text='sentence|content' when the
    train and eval files name the column differently; ShareGPT's from/value keys by default).
    """
    f = ml_collections.ConfigDict()
    f.instruction = 'instruction'  # alpaca
    f.input = 'input'  # alpaca (optional column; missing or None means no input)
    f.output = 'output'  # alpaca
    f.messages = 'messages|conversations'  # chat: a list of {role, content}
    f.role = 'role|from'  # chat: key of the role inside a message (ShareGPT: 'from', human/gpt)
    f.content = 'content|value'  # chat: key of the text inside a message (ShareGPT: 'value')
    f.prompt = 'prompt'  # prompt_completion
    f.completion = 'completion'  # prompt_completion
    f.text = 'text'  # text, classification
    f.text_pair = config_dict.placeholder(str)  # classification: second sentence column (None: single text)
    f.label = 'label'  # classification
    return f


def default_data_config():
    c = ml_collections.ConfigDict()
    # --- where the data comes from ---
    c.path = config_dict.placeholder(str)  # hub name, a file, a glob ('data/*.jsonl') or a directory
    c.name = config_dict.placeholder(str)  # hub config name (e.g. 'sst2' of 'nyu-mll/glue')
    c.split = 'train'  # hub split, or the split of a directory holding train*/validation*/test* files
    c.cache_dir = config_dict.placeholder(str)  # datasets' cache (None: ~/.cache/huggingface/datasets)
    c.num_proc = config_dict.placeholder(int)  # processes for tokenisation (None: this one)
    c.text_sample_by = 'document'  # .txt files: one example per 'line' | 'paragraph' | 'document' (file)
    # --- what an example looks like ---
    c.format = 'chat'  # alpaca | chat | prompt_completion | text | classification
    c.fields = default_fields()
    c.prompt_template = ALPACA_TEMPLATE  # alpaca, with {instruction} and {input}
    c.prompt_template_no_input = ALPACA_TEMPLATE_NO_INPUT  # alpaca rows whose input is empty (None: the above)
    c.prompt_separator = ''  # prompt_completion: text appended to the prompt (e.g. '\n'); no loss on it
    c.use_chat_template = False  # alpaca / prompt_completion: render as a user + assistant turn instead
    c.add_eos = True  # alpaca / prompt_completion / text: append EOS after the answer (it is learned)
    c.label_names = config_dict.placeholder(list)  # classification: string labels, index = class id
    c.num_labels = config_dict.placeholder(int)  # classification (None: len(label_names) or max label + 1)
    # --- length ---
    c.max_length = 512  # tokens per row: the model sees [batch, max_length]
    # right: keep the first tokens (an LM example keeps max_length + 1 tokens, since shifting drops one);
    # left: keep the last tokens (the answer survives, the start of the prompt goes);
    # drop: leave out examples that do not fit (counted in stats['num_dropped']).
    # LM examples left with no answer token after truncation are dropped and counted too.
    c.truncation = 'right'
    c.packing = True  # LM formats: several examples per row, attention and loss kept within each
    c.text_chunking = True  # text: concatenate all rows (EOS between) and cut chunks of max_length tokens
    c.text_stride = config_dict.placeholder(int)  # text chunks start every text_stride tokens (None: max_length)
    # --- bad rows (a missing field, a non-string, an empty answer, a label not in label_names) ---
    c.on_bad_row = 'error'  # error: stop, naming file, row and field | skip: count, log and leave out
    c.max_bad_fraction = 0.01  # skip: more bad rows than this fraction of the split is still an error
    # --- evaluation split: eval_path, else eval_split of `path`, else a held-out fraction of `path` ---
    c.eval_path = config_dict.placeholder(str)  # a file / glob / directory / hub name
    c.eval_split = config_dict.placeholder(str)  # e.g. 'validation' (of eval_path, or of path)
    c.eval_fraction = 0.0  # hold out this fraction of the train rows (seed-independent); 0 = no eval
    c.shuffle = True  # a new seeded permutation of the rows every epoch
    return c


def check_data_config(c):
    """Raises ValueError for a value that cannot work, before anything is loaded."""
    def bad(key, msg):
        raise ValueError(f'config.data.{key}: {msg}')
    if c.format not in FORMATS:
        bad('format', f'{c.format!r} is not one of {list(FORMATS)}.')
    if c.truncation not in TRUNCATIONS:
        bad('truncation', f'{c.truncation!r} is not one of {list(TRUNCATIONS)}.')
    if c.on_bad_row not in BAD_ROW_POLICIES:
        bad('on_bad_row', f'{c.on_bad_row!r} is not one of {list(BAD_ROW_POLICIES)}.')
    if c.max_length is None or c.max_length < 2:
        bad('max_length', f'must be an integer >= 2, got {c.max_length!r}.')
    if not 0.0 <= c.max_bad_fraction <= 1.0:
        bad('max_bad_fraction', f'must be in [0, 1], got {c.max_bad_fraction}.')
    if not 0.0 <= c.eval_fraction < 1.0:
        bad('eval_fraction', f'must be in [0, 1), got {c.eval_fraction}.')
    if c.text_stride is not None and not 1 <= c.text_stride <= c.max_length:
        bad('text_stride', f'must be in [1, max_length={c.max_length}], got {c.text_stride}.')
    if c.text_sample_by not in ('line', 'paragraph', 'document'):
        bad('text_sample_by', f"{c.text_sample_by!r} is not one of ['line', 'paragraph', 'document'].")
    if c.path is None:
        bad('path', 'is not set: pass --config.data.path=FILE_DIR_GLOB_OR_HUB_NAME.')
    return c
