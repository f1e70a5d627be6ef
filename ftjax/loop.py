"""The training loop in three parts, as Flax's lm1b and MaxText (`setup_train_loop`, `train_loop`) split it:

  run = setup(config, workdir)  validate the config -> check the workdir (a finished run stops here: `run.done`)
                                -> validate the data (no model yet) -> mesh -> model + PEFT method, built once
                                (`ftjax.build`) -> data -> sharded state -> restore the newest good checkpoint
                                (`checkpoint.resume`) -> config.json (the workdir is now this run's) -> jitted steps
  train(run, stop_at=None)      the base model's held-out evals (at step 0), then train steps with periodic eval,
                                metrics, checkpoints, the NaN policy and preemption; a later call continues
  finish(run)                   a run that reached train.steps: generation eval and harness tasks of the trained
                                model, the before/after table, summary.json -> the final metrics

`train_and_evaluate(config, workdir, stop_at=None)` is the three in a row.
"""
import dataclasses
import logging
import sys
import time
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftjax import checkpoint, data as data_lib, logs, optim, sharding
from ftjax import state as state_lib
from ftjax.build import build_data, build_model_and_mask, jit_train_step, sharded_state
from ftjax.config import validate
from ftjax.errors import EXIT_PREEMPTED
from ftjax.eval import evaluate, harness
from ftjax.models import kernels, quantize
from ftjax.models.heads import task_of
from ftjax.objectives import objective_for
from ftjax.rl import Rollouts
from ftjax.train_step import make_eval_step
from ftjax.workdir import RunDir


@dataclasses.dataclass
class Run:
    """One training run between `setup`, `train` and `finish`: what was built once, and where training is."""
    config: Any
    workdir: RunDir
    primary: bool  # process 0: prints, writes config.json and summary.json
    t_start: float
    done: Optional[dict] = None  # the summary of a run that had already finished: train and finish do nothing
    mesh: Any = None
    rules: Any = None
    pre: Any = None  # the model (`Pretrained`), built once; its params are the starting weights
    mask: Any = None
    task: str = 'lm'  # the model's task (`models.heads.task_of`)
    objective: Any = None  # `ftjax.objectives.Objective`
    train_data: Any = None
    eval_data: Any = None
    it: Any = None  # the resumable batch iterator (RL: `ftjax.rl.Rollouts`, which samples its batches)
    state: Any = None  # the sharded TrainState
    batch_sh: Any = None
    mngr: Any = None  # the orbax CheckpointManager of run.workdir
    base_ref: Any = None
    trainable_sig: Any = None
    p_step: Any = None
    p_eval: Any = None
    key: Any = None
    log: Any = None  # logs.MetricsLog
    preempt: Any = None
    step: int = 0  # steps done (the start step after setup)
    result: dict = dataclasses.field(default_factory=dict)
    last: dict = dataclasses.field(default_factory=dict)  # the latest step's metrics
    before: Optional[dict] = None  # the base model's generation eval (step 0)
    pref_before: Optional[dict] = None  # the base model's held-out metrics, when the objective compares
    trained: bool = False  # train() ran: finish may write summary.json
    compile_s: Optional[float] = None
    train_tokens: int = 0
    train_time: float = 0.0
    bad_in_a_row: int = 0

    @property
    def rl(self):
        """Batches are rollouts of the current policy (`align.loss` an RL loss)."""
        return isinstance(self.it, Rollouts)

    @property
    def evaluates_generation(self):
        c = self.config
        return c.eval.generate > 0 and self.task == 'lm' and jax.process_count() == 1 and not self.rl


def train_and_evaluate(config, workdir, stop_at=None):
    """Trains (or resumes) the run described by `config` in `workdir`; returns the final metrics.

    `stop_at`: save and return after that many steps, as a preemption would (tests, time-boxed jobs).
    """
    run = setup(config, workdir)
    train(run, stop_at)
    return finish(run)


def setup(config, workdir):
    """Everything before the first step -> Run; nothing trains yet. A finished run returns with `run.done` set
    (and nothing loaded); a new run's workdir holds only config.json afterwards."""
    t_start = time.time()
    validate(config)
    kernels.resolve(config.model.kernels, jax.default_backend())  # a kernel this platform cannot run: said now
    primary = jax.process_index() == 0
    rundir = RunDir(str(workdir))
    claim = rundir.check(config)  # a file, another run's workdir: refused before anything loads
    done = claim.finished(config)
    if done is not None:
        if primary:
            print(f"ftjax: {workdir} is finished: step {done['step']} of {done['step']} (summary in "
                  f"{rundir.summary_file}); nothing to do. Raise --config.train.steps to continue it.", flush=True)
        return Run(config, rundir, primary, t_start, done=dict(done, exit_code=0))
    data_lib.validate_data(config.data, num_labels=config.model.num_labels)  # files, columns, labels: seconds
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.mesh.rules)
    logging.info('Mesh %s over %d devices (%d processes)', dict(mesh.shape), mesh.size, jax.process_count())

    pre, mask = build_model_and_mask(config)  # the one model of the run
    objective = objective_for(config, pre.model)
    if objective.name == 'grpo':  # RL: batches sampled from the current policy, prompts from data.path
        train_data, eval_data = None, None
        it = Rollouts(config, pre, mesh, rundir.path)
    else:
        train_data, eval_data = build_data(config, pre)
        it = data_lib.make_iterator(train_data, config.train.batch_size, config.train.seed,
                                    shuffle=config.data.shuffle, process_index=jax.process_index(),
                                    process_count=jax.process_count(),
                                    pad_to_multiple_of=config.data.pad_to_multiple_of)
    trainable, _ = state_lib.partition(pre.params, mask)
    tx, schedule = optim.make_optimizer(config, trainable, config.train.steps)
    state, state_sh = sharded_state(pre, mask, tx, config, mesh, rules)
    batch_sh = sharding.batch_sharding(mesh)
    n_trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.trainable))
    n_total = n_trainable + quantize.num_weights(state.frozen)  # a quantized matrix counts its weights

    # GRPO's 'precomputed' reference (full / partial, beta > 0): the starting trainable weights, copied before a
    # resume replaces them; the frozen ones are read from the state (they never change)
    initial = jax.tree.map(jnp.copy, state.trainable) if getattr(it, 'with_reference', False) else None
    mngr = checkpoint.make_manager(rundir.path, config.train)
    base_ref = checkpoint.base_reference(config.model.path, quantize.describe(config.model))
    trainable_sig = checkpoint.leaf_signature(state.trainable)
    state, meta, start, note = checkpoint.resume(mngr, rundir.path, config.train, state, base_ref, trainable_sig,
                                                 primary)
    if meta is not None:
        it.restore(meta['data'])
        logging.info('Resumed from %s', checkpoint.step_dir(mngr, start))
    if note and primary:
        print(f'ftjax: {note}', flush=True)
    rundir.commit_config(config, claim, primary)  # the run fits the workdir: config.json is now this run's

    eval_fn = make_eval_step(pre.model, config)
    if primary:
        print(f'ftjax: {config.peft.method} fine-tuning of {config.model.path}: {n_trainable:,} of {n_total:,} '
              f'params train ({100 * n_trainable / max(n_total, 1):.2f}%); '
              f'{len(it.train) if objective.name == "grpo" else len(train_data)} train '
              f'{"prompts" if objective.name == "grpo" else "rows"}, steps {start}->{config.train.steps}', flush=True)
    run = Run(config, rundir, primary, t_start, mesh=mesh, rules=rules, pre=pre, mask=mask, task=task_of(pre.config),
               objective=objective, train_data=train_data, eval_data=eval_data, it=it,
               state=state, batch_sh=batch_sh, mngr=mngr, base_ref=base_ref, trainable_sig=trainable_sig,
               p_step=jit_train_step(pre.model, config, tx, schedule, state_sh, batch_sh),
               p_eval=jax.jit(lambda s, b: eval_fn(s.params(), b), in_shardings=(state_sh, batch_sh)),
               key=jax.random.key(config.train.seed), step=start,
               log=logs.MetricsLog(rundir.path, config.train.steps, start, log_every=config.train.log_every),
               preempt=checkpoint.Preemption(mngr),
               result={'exit_code': 0, 'trainable_params': n_trainable, 'total_params': n_total})
    if run.rl:
        it.bind(lambda: run.state.params(),  # rollouts sample with the parameters as they train
                None if initial is None else lambda: state_lib.combine(initial, run.state.frozen))
    return run


def train(run, stop_at=None):
    """Trains `run` from `run.step` to config.train.steps, or until `stop_at` steps or a preemption (saved either
    way; result['exit_code'] says which) -> run. Calling it again continues from there; a preempted or
    finished run does nothing."""
    c = run.config
    if run.done is not None or run.result['exit_code'] != 0:
        return run
    run.trained = True
    if run.step == 0 and run.before is None and run.pref_before is None:
        _evaluate_base(run)
    start = run.step
    meter = logs.Throughput()
    run.log.progress(start)  # the progress display (and its ETA clock) starts here
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
        for step in range(start, c.train.steps):
            if run.preempt.should_stop(step) or step == stop_at:
                _stop(run, step, preempted=step != stop_at)
                break
            host = next(run.it)  # RL: sampled here, with the current params
            batch = data_lib.to_global(host, run.batch_sh)
            tokens_per_batch = c.train.batch_size * host['input_ids'].shape[1]  # padded positions of the batch
            t0 = time.perf_counter()
            run.state, metrics = run.p_step(run.state, batch, jax.random.fold_in(run.key, step))
            metrics = jax.device_get(metrics)  # one sync per step: the NaN policy must see every step
            if run.rl:  # the rollout's metrics and times beside the update's
                took = time.perf_counter() - t0
                metrics = dict(metrics, **run.it.metrics, **{
                    'time/update_s': took, 'update/tokens_per_s': float(np.sum(host['segment_ids'] > 0)) / took})
            if run.compile_s is None:
                run.compile_s = time.perf_counter() - t0
                meter = logs.Throughput()
            else:
                meter.add(tokens_per_batch)
                run.train_tokens += tokens_per_batch
                run.train_time += time.perf_counter() - t0
            run.step = done = step + 1
            _check_finite(run, metrics, done)
            run.last = {k: float(np.asarray(v)) for k, v in metrics.items()}
            evals = {}
            if _evaluates(run) and (done % c.train.eval_every == 0 or done == c.train.steps):
                with meter.paused():  # tokens/s is the training's
                    evals = _held_out(run)
            if done % c.train.log_every == 0 or done == c.train.steps or evals:
                row = dict(run.last, tokens_per_s=meter.rate() if done > start + 1 else 0.0, **evals)
                run.log.write(done, row)
                run.log.progress(done, run.last.get('loss'), row['tokens_per_s'])
            if run.rl and (done % c.train.log_every == 0 or done == c.train.steps):
                run.log.note(f'ftjax: step {done}: {rl_line(run.last)}')
            if evals:
                run.log.note(f'ftjax: step {done}: {format_metrics(evals)}')
            if done % c.train.checkpoint_every == 0 or done == c.train.steps:
                checkpoint.save(run.mngr, done, run.state, _meta(run, done), metrics=evals or None,
                                force=done == c.train.steps)
            run.result.update(evals)
    run.mngr.wait_until_finished()
    return run


def finish(run):
    """The end of a run -> its final metrics. After a run that reached train.steps: the trained model's
    generation eval and harness tasks, the before/after tables, and summary.json. A run that was set up but
    never trained writes nothing (its config.json alone still counts as a new run)."""
    if run.done is not None:
        return run.done
    c, result = run.config, run.result
    run.mngr.wait_until_finished()
    result.update({'step': int(run.state.step), 'loss': run.last.get('loss'), 'compile_s': run.compile_s,
                   'tokens_per_s': run.train_tokens / max(run.train_time, 1e-9) if run.train_time else 0.0})
    finished = run.trained and result['exit_code'] == 0 and result['step'] == c.train.steps
    after = None
    if run.evaluates_generation and finished:
        with jax.set_mesh(run.mesh):
            after = evaluate.generation_eval(run.pre, run.state, c, desc='fine-tuned model answers')
        run.log.write(result['step'], evaluate.gen_metrics(after))
        for s in after['samples'][:c.eval.log_samples]:
            run.log.text(result['step'], 'samples', f"{s['prompt']}\n\n-> {s['answer']}")
        result.update(evaluate.gen_metrics(after))
        if run.before is not None:
            result.update({f'{k}_base': v for k, v in evaluate.gen_metrics(run.before).items()})
    if c.eval.harness_tasks and finished and run.task == 'lm':
        result.update(run_harness(run))
        run.log.write(result['step'], {k: v for k, v in result.items() if k.startswith('harness/')})
    run.log.close()
    result['wall_s'] = wall = time.time() - run.t_start
    if after is not None and run.primary and run.before is not None:
        print_before_after(run.before, after, result, c.eval.log_samples)
    if run.pref_before is not None and finished and run.primary:
        print(run.objective.before_after(run.pref_before, result), flush=True)
    if run.primary and run.trained and result['exit_code'] == 0:
        ev = format_metrics({k: v for k, v in result.items() if k.startswith('eval/')})
        loss = logs.significant(result['loss']) if result['loss'] is not None else 'n/a'
        print(f"ftjax: done. step {result['step']}, loss {loss}{', ' + ev if ev else ''}, wall {wall:.0f}s",
              flush=True)
        run.workdir.write_summary(result)
    return result


def _evaluate_base(run):
    """Before the first step: the base model's generation eval, and the held-out metrics of an objective that
    prints a before/after table (preference: reward accuracy and margins), logged at step 0."""
    c = run.config
    if run.evaluates_generation:
        with jax.set_mesh(run.mesh):
            run.before = evaluate.generation_eval(run.pre, run.state, c, desc='base model answers')
        run.log.write(0, evaluate.gen_metrics(run.before))
        print(f"ftjax: base model {' '.join(evaluate.headline(run.before))} on {run.before['n']} held-out prompts",
              flush=True)
    if run.objective.before_after is not None and _evaluates(run):
        with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
            run.pref_before = _held_out(run)
        run.log.write(0, run.pref_before)
        run.result.update({f'base/{k}': v for k, v in run.pref_before.items()})  # summary.json: before training


def _evaluates(run):
    """Whether the run has held-out data to evaluate on (RL: held-out prompts, `eval.generate` of them)."""
    return bool(run.it.eval) if run.rl else run.eval_data is not None


def _held_out(run):
    """The held-out metrics: the eval split's (loss, accuracy, the objective's own), or RL's greedy reward."""
    if run.rl:
        return run.it.evaluate()
    return evaluate.eval_split(run.p_eval, run.state, run.eval_data, run.config, run.batch_sh, run.task)


def _meta(run, step):
    return {'step': int(step), 'data': {k: int(v) for k, v in run.it.state.items()}, 'base': run.base_ref,
            'trainable': run.trainable_sig, 'peft_method': run.config.peft.method}


def _stop(run, step, preempted):
    """Saves `step` (unless it is saved already) and says how to resume."""
    if run.mngr.latest_step() != step:
        checkpoint.save(run.mngr, step, run.state, _meta(run, step), force=True)
    run.mngr.wait_until_finished()
    print(f"ftjax: {'preempted' if preempted else 'stopped'}; saved step {step} to "
          f"{checkpoint.step_dir(run.mngr, step)}; rerun the same command to resume.", flush=True)
    run.result['exit_code'] = EXIT_PREEMPTED if preempted else 0


def _check_finite(run, metrics, done):
    """train.nan_policy: a non-finite step stops the run ('halt', or too many in a row) or is skipped."""
    c = run.config
    if metrics.get('is_finite', True):
        run.bad_in_a_row = 0
        return
    run.bad_in_a_row += 1
    msg = f'non-finite loss/gradients at step {done}'
    if c.train.nan_policy == 'halt' or run.bad_in_a_row > c.train.max_nan_skips:
        run.mngr.wait_until_finished()
        raise FloatingPointError(
            f"{msg} (train.nan_policy={c.train.nan_policy!r}, {run.bad_in_a_row} in a row); stopped. The last good "
            f"checkpoint is step {run.mngr.latest_step()} in {run.workdir.path}. Lower optim.learning_rate, check the "
            f"data, or set train.nan_policy='skip'.")
    logging.warning('%s: update skipped (%d in a row)', msg, run.bad_in_a_row)


def run_harness(run):
    """The fine-tuned model on config.eval.harness_tasks (lm-evaluation-harness): harness.json in the run's
    directory, and its summary as {'harness/task/metric': value}. One process only (as the generation eval)."""
    c = run.config
    if jax.process_count() > 1:
        logging.warning('eval.harness_tasks runs in single-process runs only; evaluate this run afterwards with '
                        'python -m ftjax evaluate --workdir=%s --tasks=...', run.workdir.path)
        return {}
    current = dataclasses.replace(run.pre, params=run.state.params())  # on the mesh already: placed, not copied
    _, summary = harness.evaluate_model(
        current, c.eval.harness_tasks, out=str(run.workdir.harness_file), include_path=c.eval.harness_include_path,
        limit=c.eval.harness_limit or None, batch_size=c.eval.batch_size, mesh=run.mesh,
        meta={'model': c.model.path, 'step': int(run.state.step)})
    return {f'harness/{k}': v for k, v in summary.items()}


def print_before_after(before, after, result, samples=3):
    name, _ = evaluate.headline(after)
    rows = [('base model', evaluate.headline(before)[1], 0, '', ''),
            ('fine-tuned', evaluate.headline(after)[1], result['step'], f"{result.get('tokens_per_s', 0):,.0f}",
             f"{result['wall_s']:.0f}")]
    print(f"\n| model | {name} (n={after['n']}) | steps | train tokens/s | wall s |\n|---|---|---|---|---|")
    for label, value, steps, tps, wall in rows:
        print(f'| {label} | {value} | {steps} | {tps} | {wall} |')
    for s in after['samples'][:samples]:  # whole: the prompt's last user message, the answer, the reference
        print(f"\nprompt: {_indented(s['prompt'])}\nanswer: {_indented(s['answer'])}\n"
              f"reference: {_indented(s['reference'])}")
    sys.stdout.flush()


def _indented(text):
    return str(text).replace('\n', '\n  ')  # continuation lines indented under the label


def rl_line(m):
    """One console line of an RL step: reward, KL, clipping, lengths, and the time of rollout, scoring and update."""
    return (f"reward {m['reward']:.3f} (std {m['reward_std']:.3f}, zero-std groups {m['frac_reward_zero_std']:.0%}), "
            f"kl {logs.significant(m['kl'])}, clipped {m['clip_ratio/region_mean']:.1%}, length "
            f"{m['completions/mean_length']:.0f}/{m['completions/max_length']:.0f} | rollout {m['time/rollout_s']:.1f} s "
            f"({m['rollout/tokens_per_s']:.0f} tok/s), score {m['time/score_s']:.2f} s, update "
            f"{m['time/update_s']:.1f} s ({m['update/tokens_per_s']:.0f} tok/s)")


def format_metrics(metrics):
    """{'eval/loss': 0.29481, ...} -> 'eval/loss 0.2948, ...' (4 significant digits)."""
    return ', '.join(f'{k} {logs.significant(v)}' for k, v in metrics.items())
