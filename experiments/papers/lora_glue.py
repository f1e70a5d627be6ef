r"""LoRA on GLUE with RoBERTa-base: Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"
(arXiv:2106.09685), Section 5.1 / Table 2, hyperparameters from Appendix D, Table 9.

  # the paper's setup (TPU or GPU, network for roberta-base and the hub's GLUE):
  python -m ftjax train --config=experiments/papers/lora_glue.py:sst2 --workdir=runs/lora_glue_sst2
  # reduced scale on a CPU with the packaged all-MiniLM-L6-v2 and ../shared/data (sst2, mrpc only):
  python -m ftjax train --config=experiments/papers/lora_glue.py:sst2,cpu --workdir=runs/lora_glue_sst2_cpu

Setup (paper): LoRA on W_q and W_v only, r=8, alpha=8, AdamW, linear schedule with 6% warmup, max
sequence length 512, classifier head trained, the rest frozen (0.3M trainable parameters).
Per task (batch size, epochs, learning rate) from Table 9, RoBERTa-base LoRA:
  SST-2 16, 60, 5e-4 | MRPC 16, 30, 4e-4 | CoLA 32, 80, 4e-4 | QNLI 32, 25, 4e-4 | RTE 32, 80, 5e-4
  | STS-B 16, 40, 4e-4
Reported dev results (Table 2, RoBERTa-base, LoRA; median of 5 seeds) vs full fine-tuning (FT*):
  SST-2 95.1 vs 94.8 (acc) | MRPC 89.7 vs 90.2 (acc) | CoLA 63.4 vs 63.6 (Matthews corr.)
  | QNLI 93.3 vs 92.8 (acc) | RTE 86.6 vs 78.7 (acc) | STS-B 91.5 vs 91.2 (Pearson)
Differences to the paper: the paper starts MRPC/RTE/STS-B from an MNLI-adapted LoRA checkpoint in its
main rows (not here); ftjax reports accuracy and macro-F1 (not Matthews/Pearson); STS-B is a
regression task and needs a 1-output regression head, which ftjax's classifier does not provide yet
(the config is given for completeness and refuses to run). `cpu` scales down to MiniLM, max length
128, 600 steps, so its numbers are not comparable to the paper's; see docs/results/sst2_minilm.md.
Smoke (2 steps, ~15 s on the 2-core CPU; both tested in tests/test_experiments.py):
  python -m ftjax train --config=experiments/papers/lora_glue.py:sst2,cpu,smoke --workdir=/tmp/lora_glue_smoke
  (and :mrpc,cpu,smoke)
"""
from ftjax.config import default_config, parse_arg, smoke as smoke_config
from ftjax.data.locations import SHARED_GLUE, use_shared_glue
from ftjax.errors import ConfigError

# task: (GLUE name, text field(s), num_labels, batch, epochs, lr, train rows)
TASKS = {
    'sst2': ('sst2', ('sentence', None), 2, 16, 60, 5e-4, 67_349),
    'mrpc': ('mrpc', ('sentence1', 'sentence2'), 2, 16, 30, 4e-4, 3_668),
    'cola': ('cola', ('sentence', None), 2, 32, 80, 4e-4, 8_551),
    'qnli': ('qnli', ('question', 'sentence'), 2, 32, 25, 4e-4, 104_743),
    'rte': ('rte', ('sentence1', 'sentence2'), 2, 32, 80, 5e-4, 2_490),
    'stsb': ('stsb', ('sentence1', 'sentence2'), 1, 16, 40, 4e-4, 5_749),
}


def get_config(arg='sst2'):
    task, flags = parse_arg(arg, 'sst2', sorted(TASKS), 'experiments/papers/lora_glue.py', flags=('cpu', 'smoke'))
    cpu, smoke = 'cpu' in flags, 'smoke' in flags
    glue, (text, pair), num_labels, batch, epochs, lr, rows = TASKS[task]
    if num_labels == 1:
        raise ConfigError('experiments/papers/lora_glue.py:stsb: STS-B is regression; ftjax has no regression head '
                          'yet (see the docstring).')
    c = default_config()
    c.model.path = 'FacebookAI/roberta-base'
    c.model.num_labels = num_labels
    c.model.pooling = 'cls'
    c.peft.method = 'lora'
    c.peft.lora.rank = 8
    c.peft.lora.alpha = 8.0
    c.peft.lora.targets = ['(q|v)_proj$']
    c.peft.head = True
    c.data.format = 'classification'
    c.data.path, c.data.name, c.data.eval_split = 'nyu-mll/glue', glue, 'validation'
    c.data.fields.text, c.data.fields.text_pair = text, pair
    c.data.max_length = 512
    c.data.packing = False
    c.optim.name = 'adamw'
    c.optim.learning_rate = lr
    c.optim.schedule = 'linear'
    c.optim.weight_decay = 0.01
    c.train.batch_size = batch
    c.train.steps = epochs * rows // batch
    c.optim.warmup_steps = int(0.06 * c.train.steps)
    c.train.eval_every = rows // batch  # once per epoch
    c.train.eval_batches = 0
    c.train.checkpoint_every = c.train.eval_every
    c.train.keep_best_by = 'eval/accuracy'
    if cpu:
        if task not in SHARED_GLUE:
            raise ConfigError(f'experiments/papers/lora_glue.py:{task},cpu: the CPU variant exists for '
                              f'{sorted(SHARED_GLUE)} only (local copies in ../shared/data).')
        c.model.path = 'packaged:minilm'
        use_shared_glue(c, task)  # max length 128 for both
        c.data.max_length = 128
        c.train.steps = 600
        c.optim.warmup_steps = 36
        c.train.eval_every = 200
        c.train.checkpoint_every = 200
    if smoke:
        smoke_config(c, max_length=32, batch_size=4)
    return c
