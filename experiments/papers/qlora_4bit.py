r"""4-bit vs 8-bit vs float32 frozen bases under LoRA, 3 seeds: Dettmers et al., 2023, "QLoRA: Efficient Finetuning
of Quantized LLMs" (arXiv:2305.14314), Table 3 (16-bit vs 8-bit vs 4-bit NF4 + double quantization bases under
LoRA, on GLUE with RoBERTa-large and Super-NaturalInstructions with T5) and Section 4 ("4-bit QLoRA matches 16-bit
full and LoRA fine-tuning"), at CPU scale with SmolLM2-135M-Instruct on the quickstart's extraction task.

Claim: LoRA on a base stored in 4-bit NormalFloat (with or without double quantization of the block scales)
reaches the accuracy of LoRA on the 16-bit base. Here the reference is the float32 base, the measure is greedy
exact match of the JSON answer on 100 held-out prompts, and the question is whether every quantized base is
inside the seed-to-seed and example-to-example noise of the float32 one.

One command per task (4 bases x 3 seeds, then the grouped report, each base against float32), and the ablation:

  python -m ftjax sweep --config=experiments/papers/qlora_4bit.py --grid=arg=f32,int8,nf4,nf4_dq --seeds=3 \
      --baseline=arg=f32 --metric='final gen/exact_match' --workdir=runs/papers/qlora_4bit
  python -m ftjax sweep --config=experiments/papers/qlora_4bit.py:sst2 --grid=arg=f32,int8,nf4,nf4_dq \
      --seeds=3 --baseline=arg=f32 --metric='final gen/exact_match' --workdir=runs/papers/qlora_4bit_sst2
  python -m ftjax sweep --config=experiments/papers/qlora_4bit.py --grid=arg=f32,nf4_dq_linear --seeds=3 \
      --baseline=arg=f32 --metric='final gen/exact_match' --workdir=runs/papers/qlora_4bit  # the paper's setup
  python -m ftjax sweep --config=experiments/papers/qlora_4bit.py:sst2,long --grid=arg=f32,int8,nf4,nf4_dq \
      --seeds=3 --baseline=arg=f32 --metric='final gen/exact_match' --workdir=runs/papers/qlora_4bit_sst2_long

(A sweep may run a part of the grid first, e.g. --grid=arg=f32,nf4_dq; the full grid later skips what finished.)

Variants (the arg): f32 (the float32 base) | int8 (per-output-channel int8) | nf4 (NF4, blocks of 64) | nf4_dq (NF4
with double quantization: the block scales themselves in 8 bits) | nf4_dq_linear (nf4_dq on the linear layers
only, the token embedding and so SmolLM2's tied LM head kept in float32, as the paper's bitsandbytes
quantization does: `model.quantize_embedding=false`); every frozen kernel and (but in nf4_dq_linear) the
embedding stored quantized and dequantized at each matmul (`model.quantize`, ftjax/models/quantize.py), LoRA r=8
on every linear layer in float32, 10 steps of batch 8 at learning rate 5e-4 (2 warm-up steps, cosine decay): a
budget at which float32 exact match is not at its ceiling (the quickstart's 20 steps at 2e-3 reach it: float32
seed 0 answered 100/100 on 2026-12-04, where every base would "match" for want of room to differ). Flag sst2: SST-2
(../shared/data/sst2) with SmolLM2 as a generator: the review in a chat turn, the digit of its label (1 positive, 0
negative) as the answer, exact match of the greedy answer on the first 200 dev reviews. Flag long (with sst2):
60 steps at 2e-4 (6 warm-up), dev loss every 10, a budget at which float32 learns SST-2 (10 steps do not; 60 at
1e-3 did not either: 0.54). Flag smoke (2 steps; tested in tests/test_experiments.py). The seed sets the LoRA A
initialisation and the data order. What differs from the paper: a 135M model (the paper: 125M-65B), float32
(not bfloat16) as the unquantized reference, a synthetic extraction task scored by exact match instead of GLUE /
Super-NaturalInstructions / MMLU.
Measured (2026-12-04, 2-core Intel Xeon; docs/results/papers_qlora_4bit.md), exact match, mean of 3 seeds, and the
difference to float32 with its 95% interval over the seeds:
  quickstart task: float32 0.8367; int8 0.8300, -0.0067 [-0.0333, +0.0200] (reproduced); NF4 0.5100, -0.3267
  [-0.3567, -0.2967] and NF4 + DQ 0.5133, -0.3233 [-0.3467, -0.2967] (not reproduced); NF4 + DQ on the linear
  layers only (the paper's setup) 0.6900, -0.1467 [-0.1833, -0.1067] (not reproduced; half the gap).
  SST-2: float32 0.4767, int8 0.4817, NF4 0.5883, NF4 + DQ 0.5917: inconclusive, no base learned the task in 10
  steps (float32 scores what answering "1" to every review scores, 0.475). sst2,long (2026-12-05, 12 runs, ~11 min
  each): float32 0.6683; int8 0.6767, paired by seed +0.0083 [-0.0250, +0.0400] (reproduced); NF4 0.6367, -0.0317
  [-0.0800, +0.0150] and NF4 + DQ 0.6383, -0.0300 [-0.0750, +0.0200] (inconclusive: inside the noise, which still
  admits an 8-point loss).
"""
from ftjax import synthetic
from ftjax.config import default_config, parse_arg, smoke as smoke_config
from ftjax.errors import ConfigError

VARIANTS = ('f32', 'int8', 'nf4', 'nf4_dq', 'nf4_dq_linear')
LONG_SST2 = {'steps': 60, 'learning_rate': 2e-4, 'warmup_steps': 6}  # flag long: float32 learns SST-2 (0.705)
SST2_PROMPT = ('Movie review: {instruction}\nIs this review positive or negative? Answer with one digit: 1 for '
               'positive, 0 for negative.')


def get_config(arg='nf4_dq'):
    variant, flags = parse_arg(arg, 'nf4_dq', VARIANTS, 'experiments/papers/qlora_4bit.py',
                               flags=('sst2', 'long', 'smoke'))
    if 'long' in flags and 'sst2' not in flags:
        raise ConfigError('experiments/papers/qlora_4bit.py: the long flag is the SST-2 budget at which float32 '
                          'learns the task; write sst2,long.')
    c = default_config()
    c.model.path = 'packaged:smollm2'
    c.model.quantize = {'f32': 'none', 'int8': 'int8'}.get(variant, 'nf4')
    c.model.quantize_double = variant.startswith('nf4_dq')
    c.model.quantize_embedding = variant != 'nf4_dq_linear'  # the paper (bitsandbytes): linear layers only
    c.peft.method = 'lora'
    c.peft.lora.rank = 8
    c.peft.lora.alpha = 16.0
    synthetic.use_task(c)  # the extraction task: data.*, eval.* (ftjax/synthetic.py)
    c.eval.generate = 100  # every held-out prompt: the interval over examples is +-~9 points at 50%
    c.optim.learning_rate = 5e-4
    c.optim.warmup_steps = 2
    c.train.steps = 10
    c.train.batch_size = 8
    c.train.log_every = 1
    c.train.eval_every = 5
    c.train.eval_batches = 2
    c.train.checkpoint_every = 10
    if 'sst2' in flags:  # the review in a chat turn, its label's digit out (SST-2's train.tsv / dev.tsv columns)
        c.data.path, c.data.eval_path = 'shared:sst2/train.tsv', 'shared:sst2/dev.tsv'
        c.data.format = 'alpaca'
        c.data.fields.instruction, c.data.fields.output = 'sentence|content', 'label'
        c.data.prompt_template_no_input = SST2_PROMPT  # the files have no input column
        c.data.use_chat_template = True
        c.eval.generate, c.eval.scorer, c.eval.max_new_tokens = 200, 'exact', 3
    if 'long' in flags:
        c.train.steps = LONG_SST2['steps']
        c.optim.learning_rate, c.optim.warmup_steps = LONG_SST2['learning_rate'], LONG_SST2['warmup_steps']
        c.train.eval_every = c.train.checkpoint_every = LONG_SST2['steps'] // 6
        c.train.eval_batches = 4
    if 'smoke' in flags:
        smoke_config(c, max_length=160)
    return c
