"""The config schema: every key once, with its default, type, allowed values and meaning.

`default_config()` builds the ConfigDict an experiment file (`experiments/*.py`) starts from, and
`validate(config)` checks a finished one against the same table: unknown keys (with the closest
valid key), types, allowed values or ranges, required keys, and the few checks that involve two keys.
Every key is part of the command-line surface (`--config.peft.lora.rank=16`): sweeps, docs and
users' scripts depend on these names, so rename nothing; add keys instead.

Text to values, once for every surface (`--config.KEY=VALUE`, a sweep's `--grid`, tests): `parse_value`
reads a key's text as its type, `apply_overrides` sets [(key, text), ...] on a config and `override` sets
{key: value}; `load_experiment` / `load_config` read an experiment file.

  python -m ftjax config              # the table of every key (ftjax/cli/config.py)
  python -m ftjax config --markdown   # the same as docs/config.md (tests keep the file in sync)
"""
import ast
import copy
import difflib
import importlib.util
import os

import ml_collections
from ml_collections import config_dict

from ftjax.config_checks import (AT_LEAST_2, AXIS_SIZE, BELOW_HALF, CHAT_TEMPLATE, DTYPES, FRACTION,
                                  FRACTION_BELOW_1, MESH_AXES, MULTIPLIERS, NON_NEGATIVE, POSITIVE, POSITIVE_INT,
                                  REGEXES, RULES, TARGETS, TYPE_NAMES, K, one_of)
from ftjax.errors import ConfigError, MissingFileError

LORA_TARGETS_ATTN_MLP = ['(q|k|v|o)_proj$', '(gate|up|down)_proj$']
DEFAULT_RULES = [  # logical axis -> mesh axes; first matching, unused mesh axis wins (flax semantics)
    ('activation_batch', ('data', 'fsdp')),
    ('activation_length', None),
    # Block-boundary activations keep the embedding dim whole (Megatron style). Sharding it over
    # 'tensor' as well hits an XLA CPU SPMD miscompile on a data=2,fsdp=2,tensor=2 mesh (jax 0.10.2):
    # x[('data','fsdp'), None, 'tensor'] @ w['tensor', 'fsdp'] returns wrong rows.
    ('activation_embed', None), ('layers', None), ('vocab', 'tensor'), ('embed', 'fsdp'), ('embed_out', None),
    ('heads', 'tensor'), ('kv_heads', 'tensor'), ('mlp', 'tensor'), ('norm', None),
]
ALPACA_TEMPLATE = (
    'Below is an instruction that describes a task, paired with an input that provides further context. '
    'Write a response that appropriately completes the request.\n\n'
    '### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n')
ALPACA_TEMPLATE_NO_INPUT = (
    'Below is an instruction that describes a task. Write a response that appropriately completes the request.'
    '\n\n### Instruction:\n{instruction}\n\n### Response:\n')


SCHEMA = [
    # --- model ---
    K('model.path', None, 'base model: HF directory, .gguf file or hub name', kind=str, required=True),
    K('model.dtype', 'float32', 'compute dtype: float32 on CPU, bfloat16 on TPU/GPU', DTYPES),
    K('model.param_dtype', 'float32', 'storage dtype of trainable params (the master copy)', DTYPES),
    K('model.frozen_dtype', 'float32', "storage dtype of frozen params ('bfloat16' halves them)", DTYPES),
    K('model.quantize', 'none', 'frozen kernels and embeddings stored quantized (QLoRA), dequantized in the compute '
      'dtype at each matmul: int8 (per output channel), nf4 (4-bit NormalFloat, blocks of 64), gguf (the .gguf '
      "file's own blocks); what trains stays in param_dtype (ftjax/models/quantize.py)",
      one_of('none', 'int8', 'nf4', 'gguf')),
    K('model.quantize_double', False, 'nf4: quantize the block scales too (double quantization, 4.5 -> ~4.13 '
      'bits per weight)'),
    K('model.remat', 'full', "rematerialisation of each block ('full' was faster and smaller on CPU, "
      "docs/performance.md)", one_of('none', 'full', 'dots_saveable', 'dots_with_no_batch_dims_saveable',
                                     'everything_saveable')),
    K('model.scan_unroll', 1, 'blocks unrolled per step of the layer scan', POSITIVE_INT),
    K('model.kernels', 'auto', "matmul/attention/loss kernels (ftjax/models/kernels.py): 'auto' = 'cpu' on the "
      "CPU (custom VJPs), 'splash' on TPU, 'cudnn' on GPU; 'xla' = plain XLA everywhere",
      one_of('auto', 'cpu', 'xla', 'splash', 'cudnn')),
    K('model.num_labels', None, 'classification head size for encoders (None: no head)', POSITIVE_INT, kind=int),
    K('model.pooling', 'cls', 'how an encoder pools tokens for the classification head', one_of('cls', 'mean')),
    K('model.adapter', None, "start from a LoRA adapter: a PEFT adapter directory or a ftjax run's workdir "
      "(its latest checkpoint)", kind=str),
    K('model.adapter_merge', False, 'fold model.adapter into the frozen base at load: a new adapter trains on top '
      '(DPO from an SFT adapter: the adapters-off reference is then the SFT model)'),
    # --- peft ---
    K('peft.method', 'lora', 'what trains: everything, a selection, or LoRA / DoRA adapters',
      one_of('full', 'partial', 'lora', 'dora')),
    K('peft.trainable', [], 'extra regexes over parameter paths that train (partial, or on top of LoRA)',
      REGEXES, kind=list),
    K('peft.last_n_blocks', 0, 'partial: train the last N blocks', NON_NEGATIVE),
    K('peft.embeddings', False, 'partial: train the embeddings'),
    K('peft.norms', False, 'train every norm scale/bias'),
    K('peft.biases', False, 'BitFit: train every bias'),
    K('peft.head', True, 'train the classification head (when there is one)'),
    K('peft.lora.rank', 8, 'LoRA rank r', POSITIVE_INT),
    K('peft.lora.alpha', 16.0, 'LoRA scale alpha (updates are scaled by alpha / r; PEFT usual: 2 x rank)',
      POSITIVE),
    K('peft.lora.targets', LORA_TARGETS_ATTN_MLP, 'regexes over module paths that get adapters', TARGETS),
    K('peft.lora.dropout', 0.0, 'dropout on the adapter input', FRACTION_BELOW_1),
    K('peft.lora.rslora', False, 'rank-stabilised scale alpha / sqrt(r)'),
    K('peft.lora.lr_ratio', 1.0, 'LoRA+: learning rate of B = lr_ratio x learning rate of A', POSITIVE),
    # --- optim ---
    K('optim.name', 'adamw', 'optimizer', one_of('adamw', 'adafactor', 'sgd')),
    K('optim.learning_rate', 1e-4, 'peak learning rate', POSITIVE),
    K('optim.schedule', 'cosine', 'decay after warmup', one_of('cosine', 'linear', 'constant')),
    K('optim.warmup_steps', 0, 'linear warmup steps', NON_NEGATIVE),
    K('optim.end_lr_ratio', 0.0, 'final lr as a fraction of the peak (cosine, linear)', FRACTION),
    K('optim.weight_decay', 0.0, 'decoupled weight decay', NON_NEGATIVE),
    K('optim.no_decay', ['norm', 'bias$'], 'regexes over parameter paths with no weight decay', REGEXES),
    K('optim.b1', 0.9, 'adamw: first-moment decay', FRACTION_BELOW_1),
    K('optim.b2', 0.999, 'adamw: second-moment decay', FRACTION_BELOW_1),
    K('optim.eps', 1e-8, 'adamw: epsilon', POSITIVE),
    K('optim.momentum', 0.9, 'sgd: momentum (0 = none)', FRACTION_BELOW_1),
    K('optim.clip_norm', 1.0, 'global-norm gradient clipping; 0 disables', NON_NEGATIVE),
    K('optim.grad_accum', 1, 'micro-batches per step (the batch is split k ways inside the step)', POSITIVE_INT),
    K('optim.lr_multipliers', [], "per-group learning rates, 'regex=multiplier' (the first match wins)",
      MULTIPLIERS, kind=list),
    # --- train ---
    K('train.steps', 100, 'optimizer steps', POSITIVE_INT),
    K('train.batch_size', 8, 'global batch in rows (all processes)', POSITIVE_INT),
    K('train.seed', 0, 'seed of init, dropout and data order', NON_NEGATIVE),
    K('train.log_every', 10, 'steps between metric lines', POSITIVE_INT),
    K('train.eval_every', 50, 'steps between evaluations', POSITIVE_INT),
    K('train.eval_batches', 8, 'batches per evaluation; 0 = the whole eval split', NON_NEGATIVE),
    K('train.checkpoint_every', 50, 'steps between checkpoints', POSITIVE_INT),
    K('train.keep_checkpoints', 2, 'latest checkpoints kept', POSITIVE_INT),
    K('train.keep_best_by', None, "also keep the best checkpoint by this metric, e.g. 'eval/loss'", kind=str),
    K('train.resume', True, 'resume from the workdir; False refuses a non-empty workdir'),
    K('train.nan_policy', 'halt', 'on a non-finite loss: stop, or skip the update', one_of('halt', 'skip')),
    K('train.max_nan_skips', 5, 'skip: halt after this many bad steps in a row', NON_NEGATIVE),
    K('train.loss_chunk', 512, 'LM loss over the vocabulary in chunks of this many tokens', POSITIVE_INT),
    K('train.resume_step', None, 'resume from this complete step instead of the latest (newer ones are moved to '
      'checkpoints_aside/)', NON_NEGATIVE, kind=int),
    K('train.allow_config_change', False, "continue a workdir's run with a config that differs from its "
      'config.json (the old one is kept as config.<time>.json)'),
    # --- eval: generation on held-out prompts (decoders) ---
    K('eval.generate', 0, 'answer this many eval prompts greedily before and after training; 0 = off',
      NON_NEGATIVE),
    K('eval.scorer', 'exact', "how an answer is scored (ftjax/eval/scores.py; last_number: GSM8K's final number, "
      'squad_*: SQuAD-normalised, bleu/chrf: sacreBLEU corpus score / 100)',
      one_of('exact', 'json', 'last_number', 'squad_em', 'squad_f1', 'rouge1', 'rouge2', 'rougeL', 'bleu', 'chrf')),
    K('eval.max_new_tokens', 64, 'most new tokens per answer', POSITIVE_INT),
    K('eval.batch_size', 8, 'prompts per generation batch', POSITIVE_INT),
    K('eval.log_samples', 3, 'generations printed and written to TensorBoard', NON_NEGATIVE),
    K('eval.harness_tasks', [], 'lm-evaluation-harness tasks (names or YAML files) run on the fine-tuned model at '
      "the end of the run, results in the workdir's harness.json (ftjax/eval/harness.py; the eval extra)", kind=list),
    K('eval.harness_include_path', None, 'a directory of task YAMLs for eval.harness_tasks, e.g. '
      'experiments/eval_tasks', kind=str),
    K('eval.harness_limit', 0, 'examples per harness task; 0 = all', NON_NEGATIVE),
    # --- mesh ---
    K('mesh.data', -1, 'data-parallel axis size; -1: all devices not used by the other axes', AXIS_SIZE),
    K('mesh.fsdp', 1, 'fully-sharded data-parallel axis size (params sharded, batch split)', AXIS_SIZE),
    K('mesh.tensor', 1, 'tensor-parallel axis size', AXIS_SIZE),
    K('mesh.rules', [list(r) for r in DEFAULT_RULES], 'logical axis -> mesh axes; the first matching, '
      'unused mesh axis wins', RULES),
    # --- align: preference optimisation (data.format='preference'; ftjax/objectives/preference.py) ---
    K('align.loss', 'dpo', 'preference loss: dpo (sigmoid), ipo, simpo (reference-free), orpo (SFT + odds ratio, '
      'reference-free)', one_of('dpo', 'ipo', 'simpo', 'orpo')),
    K('align.beta', 0.1, 'dpo / ipo / simpo: beta (dpo: KL strength; ipo: tau; simpo: reward scale, ~2)', POSITIVE),
    K('align.label_smoothing', 0.0, 'dpo / simpo: probability that a pair is flipped (conservative DPO)',
      BELOW_HALF),
    K('align.simpo_gamma', 0.5, 'simpo: target reward margin gamma', NON_NEGATIVE),
    K('align.orpo_lambda', 0.1, 'orpo: weight of the odds-ratio term beside the SFT loss', POSITIVE),
    K('align.reference', 'auto', 'dpo / ipo reference: adapters_off (LoRA / DoRA: the base in the same step), '
      'precomputed (base log-probs of every pair before training, cached), auto (by peft.method and '
      'model.adapter_merge)',
      one_of('auto', 'adapters_off', 'precomputed')),
    # --- data: where it comes from ---
    K('data.path', None, "hub name, a file, a glob ('data/*.jsonl') or a directory", kind=str, required=True),
    K('data.name', None, "hub config name (e.g. 'sst2' of 'nyu-mll/glue')", kind=str),
    K('data.split', 'train', 'hub split, or the split of a directory holding train*/validation*/test* files'),
    K('data.cache_dir', None, "datasets' cache (None: ~/.cache/huggingface/datasets)", kind=str),
    K('data.num_proc', None, 'processes for tokenisation (None: this one)', POSITIVE_INT, kind=int),
    K('data.text_sample_by', 'document', '.txt files: one example per line, paragraph or file',
      one_of('line', 'paragraph', 'document')),
    # --- data: what an example looks like ---
    K('data.format', 'chat', 'how a row becomes tokens and an answer mask',
      one_of('alpaca', 'chat', 'prompt_completion', 'text', 'classification', 'preference')),
    K('data.fields.instruction', 'instruction', "alpaca: column of the instruction ('a|b': the first present)"),
    K('data.fields.input', 'input', 'alpaca: column of the optional input (missing or None: no input)'),
    K('data.fields.output', 'output', 'alpaca: column of the answer'),
    K('data.fields.messages', 'messages|conversations', 'chat: column of the list of {role, content}'),
    K('data.fields.role', 'role|from', "chat: key of the role inside a message (ShareGPT: 'from', human/gpt)"),
    K('data.fields.content', 'content|value', "chat: key of the text inside a message (ShareGPT: 'value')"),
    K('data.fields.prompt', 'prompt', 'prompt_completion, preference: column of the prompt (preference: text or '
      'a list of messages)'),
    K('data.fields.completion', 'completion', 'prompt_completion: column of the answer'),
    K('data.fields.chosen', 'chosen', 'preference: column of the preferred answer'),
    K('data.fields.rejected', 'rejected', 'preference: column of the dispreferred answer'),
    K('data.fields.text', 'text', 'text, classification: column of the text'),
    K('data.fields.text_pair', None, 'classification: column of the second sentence (None: single text)',
      kind=str),
    K('data.fields.label', 'label', 'classification: column of the label'),
    K('data.prompt_template', ALPACA_TEMPLATE, 'alpaca: prompt with {instruction} and {input}'),
    K('data.prompt_template_no_input', ALPACA_TEMPLATE_NO_INPUT,
      'alpaca: prompt of rows whose input is empty (None: prompt_template)', optional=True),
    K('data.prompt_separator', '', "prompt_completion: text appended to the prompt (e.g. '\\n'); no loss on it"),
    K('data.use_chat_template', False, 'alpaca / prompt_completion / preference (text prompt): render as a user + '
      'assistant turn'),
    K('data.chat_template', None, "chat / use_chat_template: None = the model's own, else its family's published "
      "format (Gemma, Qwen); a named format or a Jinja template overrides it", CHAT_TEMPLATE, kind=str),
    K('data.add_eos', True, 'alpaca / prompt_completion / text / preference: append EOS after the answer (it is '
      'learned)'),
    K('data.label_names', None, 'classification: string labels, index = class id', kind=list),
    K('data.num_labels', None, 'classification classes (None: len(label_names) or max label + 1)',
      POSITIVE_INT, kind=int),
    # --- data: length ---
    K('data.max_length', 512, 'tokens per row: the model sees [batch, max_length]', AT_LEAST_2),
    K('data.truncation', 'right', 'too long: keep the first tokens, keep the last (the answer survives), or '
      'drop the example (counted in stats)', one_of('right', 'left', 'drop')),
    K('data.packing', True, 'LM formats: several examples per row, attention and loss kept within each '
      '(preference: always one pair per row, its two sequences as two segments)'),
    K('data.text_chunking', True, 'text: concatenate all rows (EOS between) and cut max_length chunks'),
    K('data.text_stride', None, 'text chunks start every text_stride tokens (None: max_length)', POSITIVE_INT,
      kind=int),
    # --- data: bad rows (a missing field, a non-string, an empty answer, a label not in label_names) ---
    K('data.on_bad_row', 'error', 'error: stop, naming file, row and field; skip: count, log and leave out',
      one_of('error', 'skip')),
    K('data.max_bad_fraction', 0.01, 'skip: more bad rows than this fraction of the split is an error', FRACTION),
    # --- data: evaluation split: eval_path, else eval_split of path, else a held-out fraction of path ---
    K('data.eval_path', None, 'eval data: a file / glob / directory / hub name', kind=str),
    K('data.eval_split', None, "eval split, e.g. 'validation' (of eval_path, or of path)", kind=str),
    K('data.eval_fraction', 0.0, 'hold out this fraction of the train rows (seed-independent); 0 = no eval',
      FRACTION_BELOW_1),
    K('data.shuffle', True, 'a new seeded permutation of the rows every epoch'),
]
KEYS = {k.name: k for k in SCHEMA}
TRUE, FALSE = ('true', 't', 'yes', 'y', '1'), ('false', 'f', 'no', 'n', '0')  # a bool's text
GROUPS = sorted({k.name.rsplit('.', i)[0] for k in SCHEMA for i in range(1, k.name.count('.') + 1)})
SECTIONS = {'model': 'The base model and its numerics.', 'peft': 'Which parameters train.',
            'optim': 'Optimizer and learning-rate schedule.', 'train': 'The training loop.',
            'eval': 'Generation-based evaluation on held-out prompts (decoders).',
            'mesh': 'Device mesh (data, fsdp, tensor) and sharding rules.',
            'align': 'Preference optimisation (DPO, IPO, SimPO, ORPO) on `data.format=preference` pairs.',
            'data': 'The data pipeline: source, format, length, bad rows, eval split.'}


def _cross_checks(get):
    """Checks that involve two keys; `get(key)` raises KeyError for a key outside the checked part."""
    yield lambda: (get('train.batch_size') % get('optim.grad_accum') and
                   f"config.train.batch_size={get('train.batch_size')} is not divisible by "
                   f"config.optim.grad_accum={get('optim.grad_accum')}.")
    yield lambda: (get('data.text_stride') is not None and get('data.text_stride') > get('data.max_length') and
                   f"config.data.text_stride must be in [1, max_length={get('data.max_length')}], "
                   f"got {get('data.text_stride')}.")
    yield lambda: (sum(get(f'mesh.{a}') == -1 for a in MESH_AXES) > 1 and
                   f"config.mesh: only one of mesh.data/mesh.fsdp/mesh.tensor may be -1, got "
                   f"{[get(f'mesh.{a}') for a in MESH_AXES]}.")


def default_config():
    """A ConfigDict of every key at its default (None defaults are typed placeholders)."""
    c = ml_collections.ConfigDict()
    for key in SCHEMA:
        *groups, leaf = key.name.split('.')
        node = c
        for group in groups:
            if group not in node:
                node[group] = ml_collections.ConfigDict()
            node = node[group]
        node[leaf] = config_dict.placeholder(key.type) if key.default is None else copy.deepcopy(key.default)
    return c


def default_data_config():
    """The `data` group alone (ftjax.data as a library)."""
    return default_config().data


def check_data_config(data_cfg):
    return validate(data_cfg, 'data')  # the `data` group alone


def suggest(name, candidates):
    """' Did you mean config.x?' for the closest of `candidates` (dotted names), or ''."""
    close = difflib.get_close_matches(name, candidates, n=2, cutoff=0.6)
    if not close:  # a typo in the last part only: compare the last parts of the same group
        last = {c.rsplit('.', 1)[-1]: c for c in candidates if c.rsplit('.', 1)[0] == name.rsplit('.', 1)[0]}
        close = [last[c] for c in difflib.get_close_matches(name.rsplit('.', 1)[-1], last, n=2, cutoff=0.6)]
    return f" Did you mean {' or '.join('config.' + c for c in close)}?" if close else ''


def unknown_key_error(name):
    hint = suggest(name, list(KEYS)) or suggest(name, GROUPS)
    return ConfigError(f'config.{name} is not a config key.{hint} (`python -m ftjax config` lists every key.)')


def _leaves(node, prefix):
    for name, value in node.items():
        full = f'{prefix}{name}'
        if isinstance(value, ml_collections.ConfigDict):
            if full not in GROUPS:
                raise unknown_key_error(full)
            yield from _leaves(value, full + '.')
        else:
            yield full, value


def type_problem(key, value):
    """The message for a value of the wrong type for `key` (a Key), or None."""
    if value is None:
        return None if key.nullable else (
            f'config.{key.name} is not set ({key.meaning}): pass --config.{key.name}=...' if key.required else
            f'config.{key.name} must not be None ({TYPE_NAMES[key.type]}).')
    ok = {bool: lambda v: isinstance(v, bool), int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str), list: lambda v: isinstance(v, (list, tuple))}[key.type]
    return None if ok(value) else f'config.{key.name} must be {TYPE_NAMES[key.type]}, got {value!r}.'


def validate(config, at=''):
    """Raises ConfigError for the first bad key of `config` (the group at `at`, e.g. 'data', or the whole
    config): an unknown key, a missing one, a wrong type, a value not allowed, or two keys that disagree."""
    prefix = f'{at}.' if at else ''
    values = dict(_leaves(config, prefix))
    for name in values:
        if name not in KEYS:
            raise unknown_key_error(name)
    for key in SCHEMA:
        if not key.name.startswith(prefix):
            continue
        if key.name not in values:
            raise ConfigError(f'config.{key.name} is missing: build configs from ftjax.config.default_config().')
        value = values[key.name]
        problem = type_problem(key, value)
        if problem is None and value is not None and key.check is not None:
            problem = key.check.problem(key.name, value)
        if problem:
            raise ConfigError(problem)
    for cross in _cross_checks(lambda name: values[name]):
        try:
            problem = cross()
        except KeyError:  # a key outside `at`
            continue
        if problem:
            raise ConfigError(problem)
    return config


def smoke(c, max_length=64, batch_size=2):
    """Shrinks a config so that it runs in seconds (the `smoke` argument of every experiment)."""
    c.data.max_length = max_length
    c.train.steps, c.train.batch_size, c.train.log_every = 2, batch_size, 1
    c.train.eval_every, c.train.eval_batches, c.train.checkpoint_every = 2, 1, 2
    c.eval.generate, c.eval.max_new_tokens = min(c.eval.generate, 2), min(c.eval.max_new_tokens, 4)
    c.eval.batch_size = 2
    return c


def parse_arg(arg, default, variants, where, flags=('smoke',)):
    """The `arg` of an experiment's `get_config(arg)`, 'variant[,flag,...]' (just 'flag,...' when `variants`
    is empty) -> (variant, set of flags); `default` when no variant is given. Anything else is a
    ConfigError naming `where` (the experiment file) and the closest valid argument."""
    parts = [p.strip() for p in (arg or '').split(',') if p.strip()]
    variants, flags = list(variants), list(flags)
    variant = parts.pop(0) if variants and parts and parts[0] not in flags else default
    valid = f'variants: {", ".join(variants) or "none"}; flags: {", ".join(flags) or "none"}.'
    if variants and variant not in variants:
        raise ConfigError(f'{where}:{arg}: unknown variant {variant!r}.{_closest(variant, variants + flags)} '
                          f'Valid {valid}')
    for flag in parts:
        if flag not in flags:
            raise ConfigError(f'{where}:{arg}: unknown flag {flag!r}.{_closest(flag, flags + variants)} Valid {valid}')
    return variant, set(parts)


def _closest(word, words):
    close = difflib.get_close_matches(str(word), list(words), n=1, cutoff=0.5)
    return f' Did you mean {close[0]!r}?' if close else ''


# --- text to values: the command line, sweeps and tests ------------------------------------------------

def parse_value(name, text, where=None):
    """The text of the key `name` as the key's type (the one parser of `--config.KEY=VALUE` and `--grid`):
    a bool is true/false (yes/no, 1/0, ...), a number may be written 3e-4 (an int 1e3), a str may be quoted
    ('a,b'), a list key's text is a list literal or one item, and `None` fits a key that may be None."""
    key = KEYS.get(name)
    where = where or f'--config.{name}={text}'
    if key is None:
        raise ConfigError(f'{where}: {unknown_key_error(name)}')
    text = str(text)
    if text.strip() == 'None' and key.nullable:
        return None
    if key.type is list:  # a list or tuple literal, else one item: '(q|v)_proj$' is a regex, not a literal
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            value = None
        return list(value) if isinstance(value, (list, tuple)) else [value if isinstance(value, str) else text]
    if key.type is bool:
        if text.strip().lower() not in TRUE + FALSE:
            raise ConfigError(f'{where}: config.{name} is a bool (true or false).')
        return text.strip().lower() in TRUE
    if key.type is str:
        quoted = len(text) > 1 and text[0] == text[-1] and text[0] in '\'"'
        return text[1:-1] if quoted else text
    try:
        number = float(text)
    except ValueError:
        raise ConfigError(f'{where}: config.{name} must be {TYPE_NAMES[key.type]}.') from None
    if key.type is int:
        if not number.is_integer():
            raise ConfigError(f'{where}: config.{name} must be an integer.')
        return int(number)
    return number


def set_value(config, name, value, where=None):
    """Sets the dotted key `name` of `config` to `value` (a ConfigError names a group the config lacks)."""
    where = where or f'config.{name}'
    *groups, leaf = name.split('.')
    node = config
    for group in groups:
        if not isinstance(node, ml_collections.ConfigDict) or group not in node:
            raise ConfigError(f"{where}: the experiment's config has no group config.{name.rsplit('.', 1)[0]} "
                              f'(build it from ftjax.config.default_config()).')
        node = node[group]
    try:
        node[leaf] = value
    except (TypeError, KeyError, AttributeError) as e:
        raise ConfigError(f'{where}: {e}') from None


def apply_overrides(config, overrides):
    """Sets [(key, text), ...] (`--config.KEY=VALUE` in order) on `config`: a scalar key takes its last
    value, the values of a list key are joined in order. An unknown key is a ConfigError naming the closest."""
    values = {}
    for name, text in overrides:
        value = parse_value(name, text)
        if KEYS[name].type is list and values.get(name) is not None and value is not None:
            value = values[name] + value
        values[name] = value
    for name, value in values.items():
        set_value(config, name, value, f'--config.{name}')
    return config


def override(config, values):
    """A copy of `config` with `values` ({dotted key: value}, e.g. {'peft.lora.rank': 4}) set."""
    config = copy.deepcopy(config)
    for name, value in values.items():
        set_value(config, name, value)
    return config


def load_experiment(spec):
    """`file.py` or `file.py:arg` -> its get_config() or get_config('arg') (a ConfigDict)."""
    path, *arg = spec.split(':', 1)
    if not os.path.isfile(path):
        raise MissingFileError(f'--config={spec}: no file {path!r} (relative to {os.getcwd()}).')
    module_spec = importlib.util.spec_from_file_location('ftjax_experiment', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, 'get_config'):
        raise ConfigError(f'--config={spec}: {path} defines no get_config(); an experiment file returns its '
                          f'ConfigDict from get_config(arg=None).')
    config = module.get_config(*arg)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f'--config={spec}: get_config() returned {type(config).__name__}, not a ConfigDict '
                          f'(start from ftjax.config.default_config()).')
    return config


def load_config(spec, overrides=(), check=True):
    """The experiment `spec` with the [(key, text), ...] overrides applied, validated (unless not `check`)
    and locked (no key can be added)."""
    config = apply_overrides(load_experiment(spec), overrides)
    if check:
        validate(config)
    config.lock()
    return config
