"""Evaluation: `evaluate` (held-out loss, accuracy, F1 and generation-based eval, run by the training loop),
`scores` (the scorers of generated answers) and `harness` (the lm-evaluation-harness model `ftjax` and its
tasks). The command: `python -m ftjax evaluate` (ftjax/cli/evaluate.py)."""
