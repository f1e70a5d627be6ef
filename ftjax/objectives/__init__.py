"""Objectives as values: what the one train step minimises, chosen once from the config.

  objective_for(config, model) -> Objective     (`ftjax.objectives.objective`: keys, sums, normalisers,
                                                  finalize, eval_sums, reference, before_after)

  lm              language modelling: summed answer-token cross-entropy / token count
  classification  sequence classification: summed label cross-entropy / example count
  preference      DPO / IPO / SimPO / ORPO on preference pairs (`align.*`); its precomputed reference: `reference`
  grpo            GRPO / Dr. GRPO / DAPO / BNPO / GSPO on sampled completions (`align.*`; the rollouts: `ftjax.rl`)
  logprobs        token log-probs chunked over the vocabulary (all objectives, and the inference engine's tests)

`objective_for` is the only place that looks at the config to choose: `train_step.make_train_step` and
`make_eval_step` call the value's functions and never ask which objective it is. A new objective is a new
module with a `make(config) -> Objective`, its config keys (`ftjax.config`) and one line in OBJECTIVES.
"""
from ftjax.config_schema import RL_LOSSES
from ftjax.models.heads import task_of
from ftjax.objectives import classification, grpo, lm, preference
from ftjax.objectives.objective import Objective

OBJECTIVES = {'lm': lm.make, 'classification': classification.make, 'preference': preference.make,
              'grpo': grpo.make}


def objective_name(config, model) -> str:
    """An RL loss (`align.loss` grpo, dr_grpo, dapo, bnpo) trains on rollouts; preference pairs
    (`data.format='preference'`) train the preference objective; other data train the model's own task
    (`cfg.task`: an LM head or a classifier)."""
    if config.align.loss in RL_LOSSES:
        return 'grpo'
    return 'preference' if config.data.format == 'preference' else task_of(model.cfg)


def objective_for(config, model) -> Objective:
    """The objective `config` trains `model` with (`Objective`)."""
    return OBJECTIVES[objective_name(config, model)](config)
