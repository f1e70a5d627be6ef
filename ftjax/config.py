"""The default experiment config. An experiment file (`experiments/*.py`) holds only what differs.

Every key here is part of the command-line surface (`--config.peft.lora.rank=16`): sweeps, docs and
users' scripts depend on these names, so rename nothing; add keys instead.
"""
import ml_collections
from ml_collections import config_dict

LORA_TARGETS_ATTN_MLP = ['(q|k|v|o)_proj$', '(gate|up|down)_proj$']
DEFAULT_RULES = [  # logical axis -> mesh axes; first matching, unused mesh axis wins (flax semantics)
    ('activation_batch', ('data', 'fsdp')),
    ('activation_length', None),
    # Block-boundary activations keep the embedding dim whole (Megatron style). Sharding it over
    # 'tensor' as well hits an XLA CPU SPMD miscompile on a data=2,fsdp=2,tensor=2 mesh (jax 0.10.2):
    # x[('data','fsdp'), None, 'tensor'] @ w['tensor', 'fsdp'] returns wrong rows.
    ('activation_embed', None),
    ('layers', None),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('embed_out', None),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('mlp', 'tensor'),
    ('norm', None),
]


def default_config():
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.path = config_dict.placeholder(str)  # HF directory, .gguf file or hub name
    c.model.dtype = 'float32'  # compute dtype: float32 on CPU, bfloat16 on TPU/GPU
    c.model.param_dtype = 'float32'  # storage dtype of trainable params (the master copy)
    c.model.frozen_dtype = 'float32'  # storage dtype of frozen params ('bfloat16' halves them)
    c.model.remat = 'full'  # none | full | dots_saveable | ...: 'full' was faster and smaller on CPU (docs/performance.md)
    c.model.scan_unroll = 1
    c.model.num_labels = config_dict.placeholder(int)  # classification head for encoders
    c.model.pooling = 'cls'  # cls | mean
    c.model.adapter = config_dict.placeholder(str)  # start from a PEFT LoRA adapter directory

    c.peft = ml_collections.ConfigDict()
    c.peft.method = 'lora'  # full | partial | lora | dora
    c.peft.trainable = []  # extra regexes over parameter paths that train (partial, or on top of LoRA)
    c.peft.last_n_blocks = 0  # partial: train the last N blocks
    c.peft.embeddings = False  # partial: train the embeddings
    c.peft.norms = False  # train every norm scale/bias
    c.peft.biases = False  # BitFit: train every bias
    c.peft.head = True  # train the classification head (when there is one)
    c.peft.lora = ml_collections.ConfigDict()
    c.peft.lora.rank = 8
    c.peft.lora.alpha = 16.0
    c.peft.lora.targets = list(LORA_TARGETS_ATTN_MLP)
    c.peft.lora.dropout = 0.0
    c.peft.lora.rslora = False
    c.peft.lora.lr_ratio = 1.0  # LoRA+: learning rate of B = lr_ratio x learning rate of A

    c.optim = ml_collections.ConfigDict()
    c.optim.name = 'adamw'  # adamw | adafactor | sgd
    c.optim.learning_rate = 1e-4
    c.optim.schedule = 'cosine'  # cosine | linear | constant
    c.optim.warmup_steps = 0
    c.optim.end_lr_ratio = 0.0  # final lr as a fraction of the peak (cosine, linear)
    c.optim.weight_decay = 0.0
    c.optim.no_decay = ['norm', 'bias$']  # regexes: no weight decay on norms and biases
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.momentum = 0.9  # sgd
    c.optim.clip_norm = 1.0  # global-norm clipping; 0 disables
    c.optim.grad_accum = 1  # micro-batches per step (the batch is split k ways inside the step)
    c.optim.lr_multipliers = []  # ['regex=multiplier', ...] per-group learning rates

    c.train = ml_collections.ConfigDict()
    c.train.steps = 100
    c.train.batch_size = 8  # global batch (all processes)
    c.train.seed = 0
    c.train.log_every = 10
    c.train.eval_every = 50
    c.train.eval_batches = 8  # 0 = the whole eval split
    c.train.checkpoint_every = 50
    c.train.keep_checkpoints = 2
    c.train.keep_best_by = config_dict.placeholder(str)  # e.g. 'eval/loss' also keeps the best
    c.train.resume = True  # False refuses a non-empty workdir
    c.train.nan_policy = 'halt'  # halt | skip
    c.train.max_nan_skips = 5  # skip: halt after this many bad steps in a row
    c.train.loss_chunk = 512  # LM loss over the vocabulary in chunks of this many tokens
    c.train.resume_step = config_dict.placeholder(int)  # resume from this step instead of the latest

    c.eval = ml_collections.ConfigDict()  # generation-based eval on held-out prompts (decoders)
    c.eval.generate = 0  # answer this many eval prompts greedily before training and at the end; 0 = off
    c.eval.scorer = 'exact'  # exact | json | last_number (GSM8K's final number)
    c.eval.max_new_tokens = 64
    c.eval.batch_size = 8
    c.eval.log_samples = 3  # generations printed and written to TensorBoard

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices not used by the other axes
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.rules = [list(r) for r in DEFAULT_RULES]

    from ftjax.data.config import default_data_config
    c.data = default_data_config()
    return c


CHOICES = {
    'peft.method': ('full', 'partial', 'lora', 'dora'),
    'optim.name': ('adamw', 'adafactor', 'sgd'),
    'optim.schedule': ('cosine', 'linear', 'constant'),
    'train.nan_policy': ('halt', 'skip'),
    'model.remat': ('none', 'full', 'dots_saveable', 'dots_with_no_batch_dims_saveable', 'everything_saveable'),
    'model.pooling': ('cls', 'mean'),
    'model.dtype': ('float32', 'bfloat16', 'float16'),
    'model.param_dtype': ('float32', 'bfloat16', 'float16'),
    'model.frozen_dtype': ('float32', 'bfloat16', 'float16'),
    'eval.scorer': ('exact', 'json', 'last_number'),
    'data.format': ('alpaca', 'chat', 'prompt_completion', 'text', 'classification'),
}
POSITIVE = ('train.steps', 'train.batch_size', 'train.log_every', 'train.eval_every', 'train.checkpoint_every',
            'train.keep_checkpoints', 'data.max_length', 'optim.grad_accum', 'train.loss_chunk')


def _get(config, dotted):
    node = config
    for part in dotted.split('.'):
        node = node[part]
    return node


def validate(config):
    """Checks choices and ranges up front, so a typo fails before any loading or compilation."""
    if config.model.path is None:
        raise ValueError("config.model.path is not set: pass --config.model.path=DIR_OR_GGUF_OR_HUB_NAME.")
    for key, choices in CHOICES.items():
        value = _get(config, key)
        if value not in choices:
            raise ValueError(f"config.{key}={value!r} is not one of {list(choices)}.")
    for key in POSITIVE:
        if _get(config, key) is None or _get(config, key) <= 0:
            raise ValueError(f"config.{key} must be a positive integer, got {_get(config, key)!r}.")
    if config.peft.method in ('lora', 'dora') and config.peft.lora.rank <= 0:
        raise ValueError(f"config.peft.lora.rank must be a positive integer, got {config.peft.lora.rank}.")
    if config.optim.learning_rate <= 0:
        raise ValueError(f"config.optim.learning_rate must be positive, got {config.optim.learning_rate}.")
    if config.train.batch_size % config.optim.grad_accum:
        raise ValueError(f"config.train.batch_size={config.train.batch_size} is not divisible by "
                         f"config.optim.grad_accum={config.optim.grad_accum}.")
    for rule in config.optim.lr_multipliers:
        if '=' not in rule:
            raise ValueError(f"config.optim.lr_multipliers: {rule!r} should look like 'regex=multiplier'.")
    return config


def smoke(c, max_length=64, batch_size=2):
    """Shrinks a config so that it runs in seconds (the `smoke` argument of every experiment)."""
    c.data.max_length = max_length
    c.train.steps = 2
    c.train.batch_size = batch_size
    c.train.eval_every = 2
    c.train.eval_batches = 1
    c.train.checkpoint_every = 2
    c.train.log_every = 1
    c.eval.generate = min(c.eval.generate, 2)
    c.eval.max_new_tokens = min(c.eval.max_new_tokens, 4)
    c.eval.batch_size = 2
    return c


def parse_arg(arg, default, choices=None, where='experiment'):
    """'variant[,flag,...]' of `get_config(arg)` -> (variant, set of flags), e.g. 'lora,smoke'."""
    parts = (arg or default).split(',')
    if choices is not None and parts[0] not in choices:
        raise ValueError(f'{where}: variant {parts[0]!r} is not one of {list(choices)}')
    return parts[0], set(parts[1:])
