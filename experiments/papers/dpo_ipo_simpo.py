r"""DPO vs IPO vs SimPO from an SFT model, 3 seeds, with the likelihood displacement of each: Rafailov et al., 2023,
"Direct Preference Optimization" (arXiv:2305.18290); Azar et al., 2023, "A General Theoretical Paradigm to
Understand Learning from Human Preferences" (IPO, arXiv:2310.12036); Meng et al., 2024, "SimPO: Simple
Preference Optimization with a Reference-Free Reward" (arXiv:2405.14734). At CPU scale: SmolLM2-135M-Instruct
LoRA on ftjax's own preference pairs (the quickstart's JSON extraction: chosen = the exact JSON, rejected = a
plausible wrong answer), starting from the quickstart's SFT run.

Claims tested: DPO (Section 4) fits the preferences without a reward model; IPO (Sections 4.2 and 5) says that
with deterministic preferences (ours: the chosen answer is always right) DPO's implicit regularisation to the
reference vanishes, so DPO drives log p(rejected) down without bound and drifts from the SFT model, while IPO's
squared loss keeps the log-ratio margin at 1 / (2 beta); SimPO (Table 4 on AlpacaEval 2 / Arena-Hard) matches or
beats DPO without a reference model. Reported per loss (`ftjax report --metric=...`): reward accuracy on held-out
pairs, the chosen answer's summed log-prob before and after (likelihood displacement: does training on pairs
lower the probability of the right answer?), and greedy generation exact match on 32 held-out prompts before
and after.

The SFT stage, then one sweep (3 losses x 3 seeds; rerunning resumes, a finished stage is skipped):

  python -m ftjax train --config=experiments/quickstart.py --workdir=runs/quickstart && \
  python -m ftjax sweep --config=experiments/papers/dpo_ipo_simpo.py --grid=arg=dpo,ipo,simpo --seeds=3 \
      --metric='final gen/exact_match' --baseline=arg=dpo --workdir=runs/papers/dpo_ipo_simpo

Variants (the arg): dpo (beta 0.1) | ipo (beta 0.1) | simpo (beta 2.0, gamma 0.5, no reference); LoRA r=8 on top
of the SFT adapter merged into the frozen base (`model.adapter` = the quickstart's workdir, `model.adapter_merge`),
so the adapters-off reference is exactly the SFT model; 12 steps of batch 4 (48 pairs) at learning rate 5e-4 after
2 warm-up steps: the budget at which docs/results/dpo_smollm2.md measured DPO's displacement on this CPU (one run of
30 steps of batch 8 would take about an hour here); 16 held-out pairs and 16 held-out prompts scored before and
after; each batch padded only to a multiple of 8 past its longest pair (`data.pad_to_multiple_of`); flag smoke
(2 steps, tested in tests/test_experiments.py after a quickstart smoke run as the SFT stage). The seed sets the LoRA A
initialisation and the order of the pairs; the SFT stage is the same for every seed. What differs from the
papers: a 135M model, LoRA instead of full fine-tuning, a synthetic task with one right answer instead of human
preference data, and exact match instead of win rates.
Measured 2026-12-04: docs/results/papers_dpo_ipo_simpo.md (generation exact match 1.00 for every loss and seed;
no likelihood displacement from the 40-step SFT model at this budget).
"""
from ftjax import synthetic
from ftjax.config import default_config, parse_arg, smoke as smoke_config

VARIANTS = ('dpo', 'ipo', 'simpo')
SFT_RUN = 'runs/quickstart'  # `python -m ftjax train --config=experiments/quickstart.py --workdir=runs/quickstart`


def get_config(arg='dpo'):
    variant, flags = parse_arg(arg, 'dpo', VARIANTS, 'experiments/papers/dpo_ipo_simpo.py')
    c = default_config()
    c.model.path = 'packaged:smollm2'
    c.model.adapter = SFT_RUN  # read when the run loads the model
    c.model.adapter_merge = True
    c.peft.method = 'lora'
    c.peft.lora.rank = 8
    c.peft.lora.alpha = 16.0
    synthetic.use_preference_task(c, eval_prompts=16)  # data.*, eval.*: 16 held-out prompts answered greedily
    c.align.loss = variant
    c.align.beta = {'dpo': 0.1, 'ipo': 0.1, 'simpo': 2.0}[variant]
    c.align.simpo_gamma = 0.5
    c.optim.learning_rate = 5e-4
    c.optim.warmup_steps = 2
    c.train.steps = 12
    c.train.batch_size = 4
    c.train.log_every = 1
    c.train.eval_every = c.train.checkpoint_every = 12
    c.train.eval_batches = 4  # 16 held-out pairs
    c.data.pad_to_multiple_of = 8
    if 'smoke' in flags:
        smoke_config(c, max_length=320)
    return c
