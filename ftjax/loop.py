"""`train_and_evaluate(config, workdir)`: the one training loop for every fine-tuning mode.

validate the config -> check the workdir (a finished run stops here) -> validate the data (no model yet) ->
mesh -> model + PEFT method (`ftjax.build`) -> data -> sharded state -> restore the newest good checkpoint
(`checkpoint.resume`) -> config.json (the workdir is now this run's) -> jitted train steps with periodic
eval (`ftjax.evaluate`), metrics, checkpoints and preemption handling.
"""
import dataclasses
import logging
import os
import sys
import time

import flax.linen as nn
import jax
import numpy as np

from ftjax import checkpoint, data as data_lib, evaluate, harness, logs, optim, preference, sharding
from ftjax import state as state_lib
from ftjax.build import build_data, build_model_and_mask, jit_train_step, sharded_state
from ftjax.config import validate
from ftjax.errors import EXIT_PREEMPTED
from ftjax.models import quantize
from ftjax.models.heads import task_of
from ftjax.train_step import is_preference, make_eval_step
from ftjax.workdir import HARNESS_FILE, check_workdir, commit_config, finished_summary, write_summary


def _meta(config, it, base_ref, trainable_sig, step):
    return {'step': int(step), 'data': {k: int(v) for k, v in it.state.items()}, 'base': base_ref,
            'trainable': trainable_sig, 'peft_method': config.peft.method}


def train_and_evaluate(config, workdir, stop_at=None):
    """Trains (or resumes) the run described by `config` in `workdir`; returns the final metrics.

    `stop_at`: save and return after that many steps, as a preemption would (tests, time-boxed jobs).
    """
    t_start = time.time()
    validate(config)
    primary = jax.process_index() == 0
    owner = check_workdir(config, workdir)  # a file, another run's workdir: refused before anything loads
    done = finished_summary(owner, config)
    if done is not None:
        if primary:
            print(f"ftjax: {workdir} is finished: step {done['step']} of {done['step']} (summary in "
                  f"{workdir}/summary.json); nothing to do. Raise --config.train.steps to continue it.", flush=True)
        return dict(done, exit_code=0)
    data_lib.validate_data(config.data, num_labels=config.model.num_labels)  # files, columns, labels: seconds
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config.mesh.rules)
    logging.info('Mesh %s over %d devices (%d processes)', dict(mesh.shape), mesh.size, jax.process_count())

    pre, mask = build_model_and_mask(config)
    task = task_of(pre.config)
    train_data, eval_data = build_data(config, pre)
    it = data_lib.make_iterator(train_data, config.train.batch_size, config.train.seed,
                                shuffle=config.data.shuffle, process_index=jax.process_index(),
                                process_count=jax.process_count())

    trainable, _ = state_lib.partition(pre.params, mask)
    tx, schedule = optim.make_optimizer(config, trainable, config.train.steps)
    state, state_sh = sharded_state(pre, mask, tx, config, mesh, rules)
    batch_sh = sharding.batch_sharding(mesh)
    n_trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.trainable))
    n_total = n_trainable + quantize.num_weights(state.frozen)  # a quantized matrix counts its weights

    mngr = checkpoint.make_manager(workdir, config.train)
    base_ref = checkpoint.base_reference(config.model.path, quantize.describe(config.model))
    trainable_sig = checkpoint.leaf_signature(state.trainable)
    state, meta, start, note = checkpoint.resume(mngr, workdir, config.train, state, base_ref, trainable_sig, primary)
    if meta is not None:
        it.restore(meta['data'])
        logging.info('Resumed from %s', checkpoint.step_dir(mngr, start))
    if note and primary:
        print(f'ftjax: {note}', flush=True)
    commit_config(config, owner, primary)  # the run fits the workdir: config.json is now this run's

    p_step = jit_train_step(pre.model, config, tx, schedule, state_sh, batch_sh)
    eval_fn = make_eval_step(pre.model, config)
    p_eval = jax.jit(lambda s, b: eval_fn(s.params(), b), in_shardings=(state_sh, batch_sh))
    key = jax.random.key(config.train.seed)
    log = logs.MetricsLog(workdir, config.train.steps, start, log_every=config.train.log_every)
    preempt = checkpoint.Preemption(mngr)
    if primary:
        print(f'ftjax: {config.peft.method} fine-tuning of {config.model.path}: {n_trainable:,} of {n_total:,} '
              f'params train ({100 * n_trainable / max(n_total, 1):.2f}%); {len(train_data)} train rows, '
              f'steps {start}->{config.train.steps}', flush=True)
    result = {'exit_code': 0, 'trainable_params': n_trainable, 'total_params': n_total}
    gen_eval = config.eval.generate > 0 and task == 'lm' and jax.process_count() == 1
    before = None
    if gen_eval and start == 0:
        with jax.set_mesh(mesh):
            before = evaluate.generation_eval(pre, state, config, desc='base model answers')
        log.write(0, evaluate.gen_metrics(before))
        print(f"ftjax: base model {' '.join(evaluate.headline(before))} on {before['n']} held-out prompts", flush=True)
    pref_before = None
    if is_preference(config) and eval_data is not None and start == 0:  # held-out pairs before training
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            pref_before = evaluate.eval_split(p_eval, state, eval_data, config, batch_sh, task)
        log.write(0, pref_before)
        result.update({f'base/{k}': v for k, v in pref_before.items()})  # summary.json: before training
    last = {}
    bad_in_a_row = 0
    compile_s = None
    train_tokens, train_time = 0, 0.0
    meter = logs.Throughput()
    tokens_per_batch = config.train.batch_size * config.data.max_length
    log.progress(start)  # the progress display (and its ETA clock) starts here
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for step in range(start, config.train.steps):
            if preempt.should_stop(step) or step == stop_at:
                if mngr.latest_step() != step:
                    checkpoint.save(mngr, step, state, _meta(config, it, base_ref, trainable_sig, step), force=True)
                mngr.wait_until_finished()
                print(f"ftjax: {'preempted' if step != stop_at else 'stopped'}; saved step {step} to "
                      f"{checkpoint.step_dir(mngr, step)}; rerun the same command to resume.", flush=True)
                result['exit_code'] = EXIT_PREEMPTED if step != stop_at else 0
                break
            batch = data_lib.to_global(next(it), batch_sh)
            t0 = time.perf_counter()
            state, metrics = p_step(state, batch, jax.random.fold_in(key, step))
            metrics = jax.device_get(metrics)  # one sync per step: the NaN policy must see every step
            if compile_s is None:
                compile_s = time.perf_counter() - t0
                meter = logs.Throughput()
            else:
                meter.add(tokens_per_batch)
                train_tokens += tokens_per_batch
                train_time += time.perf_counter() - t0
            done = step + 1
            if not metrics.get('is_finite', True):
                bad_in_a_row += 1
                msg = f'non-finite loss/gradients at step {done}'
                if config.train.nan_policy == 'halt' or bad_in_a_row > config.train.max_nan_skips:
                    mngr.wait_until_finished()
                    kept = mngr.latest_step()
                    raise FloatingPointError(
                        f"{msg} (train.nan_policy={config.train.nan_policy!r}, {bad_in_a_row} in a row); "
                        f"stopped. The last good checkpoint is step {kept} in {workdir}. Lower "
                        f"optim.learning_rate, check the data, or set train.nan_policy='skip'.")
                logging.warning('%s: update skipped (%d in a row)', msg, bad_in_a_row)
            else:
                bad_in_a_row = 0
            last = {k: float(np.asarray(v)) for k, v in metrics.items()}
            evals = {}
            if eval_data is not None and (done % config.train.eval_every == 0 or done == config.train.steps):
                with meter.paused():  # tokens/s is the training's
                    evals = evaluate.eval_split(p_eval, state, eval_data, config, batch_sh, task)
            if done % config.train.log_every == 0 or done == config.train.steps or evals:
                row = dict(last, tokens_per_s=meter.rate() if done > start + 1 else 0.0, **evals)
                log.write(done, row)
                log.progress(done, last.get('loss'), row['tokens_per_s'])
            if evals:
                log.note(f'ftjax: step {done}: {format_metrics(evals)}')
            if done % config.train.checkpoint_every == 0 or done == config.train.steps:
                checkpoint.save(mngr, done, state, _meta(config, it, base_ref, trainable_sig, done),
                                metrics=evals or None, force=done == config.train.steps)
            result.update(evals)
    mngr.wait_until_finished()
    result.update({'step': int(state.step), 'loss': last.get('loss'), 'compile_s': compile_s,
                   'tokens_per_s': train_tokens / max(train_time, 1e-9) if train_time else 0.0})
    finished = result['exit_code'] == 0 and result['step'] == config.train.steps
    if gen_eval and finished:
        with jax.set_mesh(mesh):
            after = evaluate.generation_eval(pre, state, config, desc='fine-tuned model answers')
        log.write(result['step'], evaluate.gen_metrics(after))
        for s in after['samples'][:config.eval.log_samples]:
            log.text(result['step'], 'samples', f"{s['prompt']}\n\n-> {s['answer']}")
        result.update(evaluate.gen_metrics(after))
        if before is not None:
            result.update({f'{k}_base': v for k, v in evaluate.gen_metrics(before).items()})
    if config.eval.harness_tasks and finished and task == 'lm':
        result.update(run_harness(pre, state, config, workdir, mesh, result['step']))
        log.write(result['step'], {k: v for k, v in result.items() if k.startswith('harness/')})
    log.close()
    wall = time.time() - t_start
    result['wall_s'] = wall
    if gen_eval and finished and primary and before is not None:
        print_before_after(before, after, result, config.eval.log_samples)
    if pref_before is not None and finished and primary:
        print(preference.before_after(pref_before, result), flush=True)
    if primary and result['exit_code'] == 0:
        ev = format_metrics({k: v for k, v in result.items() if k.startswith('eval/')})
        loss = logs.significant(result['loss']) if result['loss'] is not None else 'n/a'
        print(f"ftjax: done. step {result['step']}, loss {loss}{', ' + ev if ev else ''}, wall {wall:.0f}s",
              flush=True)
        write_summary(workdir, result)
    return result


def run_harness(pre, state, config, workdir, mesh, step):
    """The fine-tuned model on config.eval.harness_tasks (lm-evaluation-harness): workdir/harness.json, and its
    summary as {'harness/task/metric': value}. One process only (as the generation eval)."""
    if jax.process_count() > 1:
        logging.warning('eval.harness_tasks runs in single-process runs only; evaluate this run afterwards with '
                        'python -m ftjax.evaluate --workdir=%s --tasks=...', workdir)
        return {}
    current = dataclasses.replace(pre, params=state.params())  # on the mesh already: placed, not copied
    _, summary = harness.evaluate_model(
        current, config.eval.harness_tasks, out=os.path.join(workdir, HARNESS_FILE),
        include_path=config.eval.harness_include_path, limit=config.eval.harness_limit or None,
        batch_size=config.eval.batch_size, mesh=mesh, meta={'model': config.model.path, 'step': step})
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


def format_metrics(metrics):
    """{'eval/loss': 0.29481, ...} -> 'eval/loss 0.2948, ...' (4 significant digits)."""
    return ', '.join(f'{k} {logs.significant(v)}' for k, v in metrics.items())
