"""What the tests share, as plain functions: tiny tokenizers and checkpoints they build themselves (no
network, no ../shared), the tiny training config, experiment files for the command lines, metrics.

The checkpoints are written by transformers' PyTorch models with `save_pretrained`, so they are
exactly what a user's Hugging Face directory looks like. torch is imported lazily, here only.
Fixtures live in tests/conftest.py; no test module imports another test module.
"""
import json
import os

import jax
import numpy as np

from ftjax import infer, optim, peft
from ftjax import state as state_lib
from ftjax import workdir as workdir_lib
from ftjax.train_step import make_train_step
from ftjax.compile_check import with_device_count
from ftjax.config import default_config, default_data_config, override
from ftjax.models import load_pretrained

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Extract the name and age: Alice is 31 years old. {\"name\": \"Alice\", \"age\": 31}",
    "user assistant system instruction input output response answer question",
    "0123456789 + - * / = ( ) [ ] { } : , . ! ? ' \"",
    "a positive review. a negative review. great movie, terrible plot, loved it, hated it.",
]


def subprocess_env(devices=1, **extra):
    """os.environ for a child process (`python -m ftjax ...`): `devices` fake CPU devices, the suite's other XLA
    flags (tests/conftest.py: LLVM at -O0) kept, the repository importable, `extra` set on top."""
    return dict(os.environ, XLA_FLAGS=with_device_count(os.environ.get('XLA_FLAGS'), devices), PYTHONPATH=REPO,
                **extra)


def make_tokenizer(vocab_size=320):
    """A byte-level BPE tokenizer with ChatML special tokens and chat template (SmolLM2-like)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", pad_token="<pad>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _save(model, tokenizer, path):
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def make_llama_checkpoint(path, seed=0, arch="llama", **overrides):
    """A tiny Llama (or Qwen2 with arch='qwen2') with random weights, saved as a HF directory."""
    import torch
    import transformers

    tok = make_tokenizer()
    cfg = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True,
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    cfg.update(overrides)
    torch.manual_seed(seed)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg))
    elif arch == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**cfg))
    else:
        raise ValueError(arch)
    _perturb_norms(model, torch)
    return _save(model.eval(), tok, path)


def make_bert_checkpoint(path, seed=0, arch="bert", num_labels=None, **overrides):
    """A tiny BERT / RoBERTa encoder (optionally ...ForSequenceClassification) as a HF directory."""
    import torch
    import transformers

    tok = make_tokenizer()
    cfg = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=128, type_vocab_size=2,
               pad_token_id=tok.pad_token_id)
    if arch == "roberta":
        cfg.update(max_position_embeddings=130, type_vocab_size=1, pad_token_id=tok.pad_token_id)
    cfg.update(overrides)
    torch.manual_seed(seed)
    config_cls = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig}[arch]
    config = config_cls(**cfg)
    if num_labels:
        config.num_labels = num_labels
        cls = {"bert": transformers.BertForSequenceClassification,
               "roberta": transformers.RobertaForSequenceClassification}[arch]
    else:
        cls = {"bert": transformers.BertModel, "roberta": transformers.RobertaModel}[arch]
    model = cls(config)
    _perturb_norms(model, torch)
    return _save(model.eval(), tok, path)


def _perturb_norms(model, torch):
    """Random init leaves norms at 1/0 and biases at 0, which would hide a mixed-up scale or bias."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


# --- training on the tiny model -------------------------------------------------------------------

def tiny_config(model_dir, data, **over):
    """6 steps of the chat task on `model_dir`; `data` is {'train': path, 'eval': path} (the chat_data fixture)."""
    c = default_config()
    c.model.path = model_dir
    c.data.path, c.data.eval_path = data['train'], data['eval']
    c.data.format = 'chat'
    c.data.max_length = 192
    c.train.batch_size = 4
    c.train.steps = 6
    c.train.log_every = 1
    c.train.eval_every = 3
    c.train.eval_batches = 1
    c.train.checkpoint_every = 3
    c.optim.learning_rate = 1e-2
    c.optim.schedule = 'cosine'
    c.optim.warmup_steps = 1
    c.mesh.data = 1
    c.mesh.fsdp = 1
    c.mesh.tensor = -1  # 8 fake devices: tensor parallel over the tiny model
    return override(c, over)  # dotted keys, e.g. **{'peft.lora.rank': 4}


EXPERIMENT = '''from tests.tiny import {config_fn}


def get_config(arg=None):
    return {config_fn}({model_dir!r}, {data!r}, **{over!r})
'''


def write_experiment(path, model_dir, data, config_fn='tiny_config', **over):
    """An experiment file (for `--config=`) whose get_config() is tiny_config(model_dir, data, **over) (or
    `config_fn`'s, e.g. 'tiny_rl_config')."""
    data = {'train': data['train'], 'eval': data['eval']}
    with open(path, 'w') as f:
        f.write(EXPERIMENT.format(config_fn=config_fn, model_dir=model_dir, data=data, over=over))
    return str(path)


def losses(workdir):
    """{step: training loss} from a run's metrics."""
    return {r['step']: r['loss'] for r in workdir_lib.RunDir(workdir).metrics() if 'loss' in r}


def data_config(tmp_path, path, **overrides):
    """`config.data` for a data file in a test: no packing, a cache under tmp_path, `fields={role: column}`."""
    c = default_data_config()
    c.path = str(path)
    c.cache_dir = str(tmp_path / 'hf_cache')
    c.packing = False
    c.max_length = 256
    for k, v in overrides.items():
        if k == 'fields':
            for role, col in v.items():
                c.fields[role] = col
        else:
            c[k] = v
    return c


# --- RL on the tiny model -------------------------------------------------------------------------

def reward_by_letters(prompts, completions, **columns):
    """A reward that varies between random completions (for RL tests): the share of 'a'-'m' letters."""
    assert 'reference' in columns and len(columns['reference']) == len(completions)
    return [sum('a' <= ch <= 'm' for ch in c) / max(len(c), 1) for c in completions]


def tiny_rl_config(model_dir, data, **over):
    """GRPO on the tiny model: 2 prompts x 4 completions of 16 tokens per step, `reward_by_letters`."""
    rl = {'align.loss': 'grpo', 'align.beta': 0.0, 'align.num_generations': 4, 'rollout.prompts': 2,
          'rollout.max_new_tokens': 16, 'align.rewards': ['tests.tiny:reward_by_letters'], 'train.batch_size': 8,
          'data.max_length': 224, 'train.steps': 4, 'train.eval_every': 2, 'train.checkpoint_every': 2,
          'eval.generate': 2, 'optim.learning_rate': 5e-3, 'mesh.tensor': 1, 'mesh.data': -1}
    return tiny_config(model_dir, data, **dict(rl, **over))


# --- one train step of a tiny model (tests/test_train_step.py, tests/test_long_context.py) ---

def make_config(method='lora', lr=1e-2, **over):
    """The default config for `method` at a constant `lr`, several loss chunks, dotted overrides."""
    c = default_config()
    c.peft.method = method
    c.optim.learning_rate = lr
    c.optim.schedule = 'constant'
    c.train.loss_chunk = 16  # several chunks even for the tiny batches
    return override(c, over)  # dotted keys, e.g. **{'peft.lora.rank': 4}


def lm_batch(vocab, b=2, t=16, seed=0):
    """A random language-modelling batch of b rows of t tokens, one segment each."""
    ids = np.random.RandomState(seed).randint(4, vocab, (b, t + 1)).astype(np.int32)
    return {'input_ids': ids[:, :-1], 'target_ids': ids[:, 1:], 'loss_mask': np.ones((b, t), np.float32),
            'segment_ids': np.ones((b, t), np.int32),
            'positions': np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()}


def build(pre, c, rng=0):
    """(prepared model, mask, tx, schedule, state, jitted step) for config `c`."""
    pre, mask = peft.prepare(pre, c, jax.random.key(rng))
    trainable, _ = state_lib.partition(pre.params, mask)
    tx, schedule = optim.make_optimizer(c, trainable, c.train.steps)
    state = jax.jit(lambda p: state_lib.create_state(p, mask, tx, c.model.frozen_dtype))(pre.params)
    step = jax.jit(make_train_step(pre.model, c, tx, schedule), donate_argnums=0)
    return pre, mask, tx, schedule, state, step


MOE_FAMILIES = {  # model_type -> (transformers class, config class, fields): tests/test_moe.py
    'qwen3_moe': ('Qwen3MoeForCausalLM', 'Qwen3MoeConfig', dict(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=96, norm_topk_prob=True,
        head_dim=32)),
    'qwen2_moe': ('Qwen2MoeForCausalLM', 'Qwen2MoeConfig', dict(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        intermediate_size=96)),
    'mixtral': ('MixtralForCausalLM', 'MixtralConfig', dict(
        num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, sliding_window=4)),
    'olmoe': ('OlmoeForCausalLM', 'OlmoeConfig', dict(
        num_experts=8, num_experts_per_tok=3, intermediate_size=32, clip_qkv=0.5)),
    'granitemoe': ('GraniteMoeForCausalLM', 'GraniteMoeConfig', dict(
        num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, embedding_multiplier=2.0,
        residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=3.0)),
}


def make_moe_checkpoint(path, family, seed=0, **over):
    """A tiny random mixture-of-experts `family` model (float32, 2 layers) saved by transformers; `over` changes
    the family's config fields."""
    import torch
    import transformers
    cls, config_cls, extra = MOE_FAMILIES[family]
    tok = make_tokenizer()
    cfg = dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.1, router_aux_loss_coef=0.02,
               bos_token_id=tok.bos_token_id, eos_token_id=None, pad_token_id=tok.pad_token_id, **{**extra, **over})
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(getattr(transformers, config_cls)(**cfg))
    _perturb_norms(model, torch)
    return _save(model.eval(), tok, path)


def greedy_against_transformers(path, new_tokens=10):
    """(ftjax's, transformers') greedy continuations of a 6- and a 3-token prompt of the HF model at `path`: ftjax
    decodes both in one left-padded batch, transformers each alone."""
    import torch
    import transformers
    pre = load_pretrained(path)
    r = np.random.RandomState(1)
    prompts = [r.randint(0, pre.config.vocab_size, n).tolist() for n in (6, 3)]
    ours = infer.generate(pre, prompts, max_new_tokens=new_tokens, eos_ids=[])
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = [ref.generate(torch.tensor([q]), max_new_tokens=new_tokens, do_sample=False)[0, len(q):].tolist()
                  for q in prompts]
    return pre, prompts, ours, theirs


def lora_test_config(**over):
    """LoRA r=4 on the default targets at a constant 5e-2 (a few steps move a tiny model), CPU kernels; `over`:
    {'section.key': value} (nested sections too)."""
    c = default_config()
    c.peft.method, c.peft.lora.rank, c.peft.lora.alpha = 'lora', 4, 8.0
    c.optim.learning_rate, c.optim.schedule, c.optim.warmup_steps = 5e-2, 'constant', 0
    c.model.kernels, c.train.loss_chunk = 'cpu', 64
    for k, v in over.items():
        section, key = k.rsplit('.', 1)
        node = c
        for part in section.split('.'):
            node = node[part]
        node[key] = v
    return c
