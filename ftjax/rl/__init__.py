"""Reinforcement learning with verifiable rewards on ftjax's own sampler: the rollouts the training loop trains
on when `align.loss` is an RL loss (grpo, dr_grpo, dapo, bnpo; the losses: `ftjax.objectives.grpo`).

  rewards.py   reward functions: built-ins and 'module:function' callables, checked calls
  rollout.py   `Rollouts`: prompts -> sampled completions (current parameters) -> rewards -> advantages -> batches
"""
from ftjax.rl.rewards import BUILTIN as BUILTIN_REWARDS
from ftjax.rl.rollout import Rollouts, advantages

__all__ = ['BUILTIN_REWARDS', 'Rollouts', 'advantages']
