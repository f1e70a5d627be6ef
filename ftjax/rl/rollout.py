"""The batches of RL with verifiable rewards: prompts -> sampled completions -> rewards -> advantages -> a train
batch, the source the training loop takes its batches from when `align.loss` is an RL loss.

  it = Rollouts(config, pre, mesh, workdir)   # prompts of data.path (json / jsonl), rewards of align.rewards
  it.bind(lambda: current_params, reference)   # the trainer's parameters, read at each rollout (and the
                                               # starting model's, when the batches carry the reference's log-probs)
  batch = next(it)                             # every align.num_iterations steps: a new rollout
  it.metrics, it.state / it.restore(state), it.evaluate()   # held-out greedy reward of the current params

Each rollout takes the next `rollout.prompts` prompts of a seeded permutation (a new one each epoch), samples
`align.num_generations` completions of each with the engine (`ftjax.infer.Sampler`) and the *current*
parameters (LoRA / DoRA / quantized leaves as the trainer holds them), with the seed fold(train.seed, rollout
index): a resumed run samples what an uninterrupted one does. Rewards are scored on the host
(`ftjax.rl.rewards`), normalised within each group (`align.scale_rewards`, TRL's formula), and the batch holds
prompt + completion per row, the completion's tokens in `loss_mask`, the sampler's log-probs as `old_logps`
and, when the GRPO reference is 'precomputed' (full / partial fine-tuning with align.beta > 0), the starting
model's log-probs of the same tokens as `ref_logps`.
With num_iterations > 1 the rollout batch is kept in `<workdir>/rollout.npz` so a run resumed between its
iterations trains on the same batch. Every completion, its prompt and rewards are appended to
`<workdir>/completions.jsonl` (a resumed run first drops the lines of the steps after its checkpoint).
"""
import functools
import json
import logging
import os
import time
import warnings

import jax
import numpy as np

from ftjax.data import layout, locations, prompt_and_answer
from ftjax.errors import ConfigError
from ftjax.eval.evaluate import last_user_message, read_rows
from ftjax.infer import Sampler, encode_prompt
from ftjax.infer.generation import cut
from ftjax.objectives import grpo
from ftjax.rl import rewards as rewards_lib


def advantages(rewards, group: int, scale: str):
    """(advantages, std used, whether that std is zero) per completion from rewards [n] (NaN: not scorable;
    its advantage is 0), grouped in consecutive runs of `group` (TRL's `scale_rewards` group / batch / none)."""
    r = np.asarray(rewards, np.float64)
    grouped = r.reshape(-1, group)
    with warnings.catch_warnings():  # an all-NaN group: its mean is NaN, its advantages 0
        warnings.simplefilter('ignore', RuntimeWarning)
        mean = np.repeat(np.nanmean(grouped, axis=1), group)
        std = np.repeat(_nanstd(grouped, axis=1), group) if scale in ('group', 'none') else \
            np.full_like(r, _nanstd(r))
    adv = r - mean
    if scale != 'none':
        adv = adv / (std + 1e-4)
    return np.nan_to_num(adv, nan=0.0).astype(np.float32), std, np.isclose(std, 0.0)


def _nanstd(x, axis=None):
    """TRL's nanstd: Bessel-corrected, ignoring NaN (NaN with fewer than two values)."""
    count = np.sum(~np.isnan(x), axis=axis)
    var = np.nanmean((x - np.nanmean(x, axis=axis, keepdims=axis is not None)) ** 2, axis=axis)
    return np.sqrt(np.where(count > 1, var * count / np.maximum(count - 1, 1), np.nan))


def batch_rows(prompts, completions, old_logps, adv, max_length, pad_id, reference=False):
    """The GRPO batch (`ftjax.data.layout` 'grpo') of prompt + completion ids per row, right-padded to
    `max_length`: input_ids / target_ids shifted by one, loss_mask and old_logps on the completion's targets
    (`reference`: with a zero 'ref_logps' for the reference's log-probs)."""
    b = layout.empty('grpo', len(prompts), max_length, pad_id, reference=reference)
    for i, (p, c, lp) in enumerate(zip(prompts, completions, old_logps)):
        seq = list(p) + list(c)
        assert len(seq) <= max_length + 1, (len(seq), max_length)
        n = len(seq) - 1  # positions with a next token
        b['input_ids'][i, :n] = seq[:-1]
        b['target_ids'][i, :n] = seq[1:]
        b['segment_ids'][i, :n] = 1
        b['positions'][i, :n] = np.arange(n)
        first = len(p) - 1  # the position whose target is the first completion token
        b['loss_mask'][i, first:n] = 1.0
        b['old_logps'][i, first:n] = np.asarray(lp, np.float32)[:len(c)]
        b['advantages'][i] = adv[i]
    return b


class Rollouts:
    """The RL batch source of the training loop (see the module docstring)."""

    def __init__(self, config, pre, mesh=None, workdir=None):
        c = config
        if jax.process_count() > 1:
            raise ConfigError(f'align.loss={c.align.loss!r}: RL runs are single-process for now ({jax.process_count()} '
                              f'processes here); run it on one host (any number of its devices).')
        self.config, self.pre, self.tok = c, pre, pre.tokenizer
        self.group, self.iterations = int(c.align.num_generations), int(c.align.num_iterations)
        self.prompts_per_step = int(c.rollout.prompts)
        self.max_new, self.max_length = int(c.rollout.max_new_tokens), int(c.data.max_length)
        self.fns = rewards_lib.load(list(c.align.rewards))
        self.weights = np.asarray(rewards_lib.weights(list(c.align.reward_weights), len(self.fns)), np.float64)
        self.names = [rewards_lib.name_of(f) for f in self.fns]
        self.stops = [s for s in c.rollout.stop if s]
        self.train = self._prompts(c.data.path, 'data.path')
        self.eval = self._prompts(c.data.eval_path, 'data.eval_path', c.eval.generate) if c.data.eval_path and \
            c.eval.generate else []
        if len(self.train) < self.prompts_per_step:
            raise ConfigError(f'config.data.path={c.data.path!r} has {len(self.train)} prompts, fewer than '
                              f'rollout.prompts={self.prompts_per_step}.')
        self.sampler = Sampler(pre, batch_size=self.prompts_per_step * self.group, mesh=mesh,
                               copy_layers=c.rollout.copy_layers)
        self.pad_id = int(self.tok.pad_token_id if self.tok.pad_token_id is not None else self.sampler.eos[0])
        self.cache = os.path.join(str(workdir), 'rollout.npz') if workdir and self.iterations > 1 else None
        self.log = os.path.join(str(workdir), 'completions.jsonl') if workdir and jax.process_index() == 0 else None
        self.served = 0  # train steps served (the state)
        self.current = None  # (rollout index, host batch) of the iterations in progress
        self.params = self.reference = None
        self.with_reference = grpo.settings(c).reference == 'precomputed'
        chunk = int(c.train.loss_chunk)
        self._ref_logps = jax.jit(lambda p, b: grpo.completion_logps(pre.model, p, b, None, chunk))
        self.metrics = {}

    def bind(self, params_fn, reference_fn=None):
        """`params_fn()`: the trainer's current parameters, read at each rollout and evaluation; `reference_fn()`:
        the starting model's (needed when the GRPO reference is 'precomputed'), read at each rollout."""
        if self.with_reference and reference_fn is None:
            raise ValueError("align.reference='precomputed': Rollouts.bind needs the starting model's parameters "
                             '(reference_fn), whose log-probs each rollout batch carries as ref_logps.')
        self.params, self.reference = params_fn, reference_fn

    # --- prompts --------------------------------------------------------------------------------------------

    def _prompts(self, path, key, limit=None):
        """[(prompt ids, prompt text for rewards, {column: value} with 'reference')] of the first `limit` rows (None:
        all) of a json / jsonl file."""
        where = locations.resolve(path, key)
        if not isinstance(where, str) or not where.endswith(('.json', '.jsonl')) or not os.path.isfile(where):
            raise ConfigError(f'config.{key}={path!r}: RL prompts are read from a local .json / .jsonl file '
                              f'(rows with a prompt and a reference answer, as data.format {self.config.data.format!r} '
                              f'reads them); hub data sets are not supported for RL yet.')
        out = []
        for i, row in enumerate(read_rows(where)[:limit]):
            try:
                prompt, reference = prompt_and_answer(row, self.config.data)
            except Exception as e:  # noqa: BLE001 - a bad row: named, in one line
                raise ConfigError(f'{where}, row {i}: {e}'.splitlines()[0]) from None
            chat = not isinstance(prompt, str)
            ids = encode_prompt(self.tok, prompt, chat)
            if len(ids) + self.max_new > self.max_length + 1:
                raise ConfigError(f'{where}, row {i}: a prompt of {len(ids)} tokens + rollout.max_new_tokens='
                                  f'{self.max_new} does not fit data.max_length={self.max_length}; raise '
                                  f'--config.data.max_length to {len(ids) + self.max_new} or more.')
            out.append((ids, last_user_message(prompt), dict(row, reference=reference)))
        return out

    def _indices(self, rollout):
        """The prompt indices of rollout number `rollout`: a seeded permutation per epoch."""
        n, per = len(self.train), self.prompts_per_step
        return [int(self._order(k // n)[k % n]) for k in range(rollout * per, (rollout + 1) * per)]

    @functools.lru_cache(maxsize=2)
    def _order(self, epoch):
        """The permutation of the training prompts in `epoch` (computed once per epoch, not per prompt)."""
        return np.random.default_rng([int(self.config.train.seed), epoch]).permutation(len(self.train))

    # --- the iterator ---------------------------------------------------------------------------------------

    @property
    def state(self):
        return {'served': self.served}

    def restore(self, state):
        self.served = int(state['served'])
        self.current = None
        if self.log and os.path.exists(self.log):  # the steps after the checkpoint are sampled again
            with open(self.log) as f:
                keep = [line for line in f if line.strip() and json.loads(line)['step'] <= self.served]
            with open(self.log, 'w') as f:
                f.writelines(keep)

    def __iter__(self):
        return self

    def __next__(self):
        rollout = self.served // self.iterations
        if self.current is None or self.current[0] != rollout:
            self.current = (rollout, self._cached(rollout) or self._rollout(rollout))
        self.served += 1
        return dict(self.current[1])

    def _cached(self, rollout):
        """The batch of `rollout` kept by an interrupted run (num_iterations > 1, resumed mid-way), else None."""
        if self.cache is None or self.served % self.iterations == 0 or not os.path.exists(self.cache):
            return None
        with np.load(self.cache) as f:
            if int(f['rollout']) != rollout:
                return None
            self.metrics = json.loads(str(f['metrics']))  # the rollout's, as the uninterrupted run logs them
            return {k: f[k] for k in layout.layout('grpo', reference=self.with_reference)}

    def _rollout(self, rollout):
        if self.params is None:
            raise RuntimeError('Rollouts.bind(params_fn) must be called before the first batch.')
        c = self.config
        index = self._indices(rollout)
        t0 = time.perf_counter()
        out = self.sampler.sample([self.train[i][0] for i in index], self.max_new, temperature=c.rollout.temperature,
                                  top_k=c.rollout.top_k, top_p=c.rollout.top_p, seed=_seed(c.train.seed, rollout),
                                  n=self.group, stop=self.stops or None, logprobs=True, params=self.params())
        t1 = time.perf_counter()
        rows = [i for i in index for _ in range(self.group)]  # completion -> prompt (data row)
        texts = [self._text(ids) for ids in out.tokens]
        table = np.asarray(self._score([self.train[i] for i in rows], texts), np.float64)  # [functions, rows]
        reward = np.where(np.all(np.isnan(table), axis=0), np.nan, np.nansum(table * self.weights[:, None], axis=0))
        adv, _, zero_std = advantages(reward, self.group, c.align.scale_rewards)
        batch = batch_rows([self.train[i][0] for i in rows], out.tokens, out.logprobs, adv, self.max_length,
                           self.pad_id, self.with_reference)
        t2 = time.perf_counter()
        if self.with_reference:  # the starting model's log-probs of the same tokens (only the completion's count)
            ref = self._ref_logps(self.reference(), {k: v for k, v in batch.items() if k != 'ref_logps'})
            batch['ref_logps'] = np.asarray(jax.device_get(ref), np.float32) * batch['loss_mask']
        t3 = time.perf_counter()
        lengths = np.asarray([len(t) for t in out.tokens])
        ended = np.asarray([bool(t) and t[-1] in self.sampler.eos for t in out.tokens])
        self.metrics = {
            'reward': float(np.nanmean(reward)), 'reward_std': float(np.nanstd(reward)),
            **{f'rewards/{n}/{stat}': float(f(table[k])) for k, n in enumerate(self.names)
               for stat, f in (('mean', np.nanmean), ('std', np.nanstd))},
            'frac_reward_zero_std': float(np.mean(zero_std.reshape(-1, self.group)[:, 0])),
            'completions/mean_length': float(lengths.mean()), 'completions/max_length': float(lengths.max()),
            'completions/clipped_ratio': float(np.mean(~ended & (lengths >= self.max_new))),
            'time/rollout_s': t1 - t0, 'time/score_s': t2 - t1,
            **({'time/reference_s': t3 - t2} if self.with_reference else {}),
            'rollout/tokens_per_s': float(lengths.sum() / max(t1 - t0, 1e-9))}
        self.last_texts = texts
        if self.log:
            with open(self.log, 'a') as f:
                for k, (i, text) in enumerate(zip(rows, texts)):
                    f.write(json.dumps({'step': self.served + 1, 'rollout': rollout, 'prompt_index': i, 'completion':
                                        text, 'reward': _finite(reward[k]), 'advantage': float(adv[k]),
                                        **{n: _finite(table[j, k]) for j, n in enumerate(self.names)}}) + '\n')
        if self.cache:
            tmp = f'{self.cache}.tmp{os.getpid()}.npz'
            np.savez(tmp, rollout=rollout, metrics=json.dumps(self.metrics), **batch)
            os.replace(tmp, self.cache)
        return batch

    def _text(self, ids):
        text = self.tok.decode(ids, skip_special_tokens=True)
        return cut(text, self.stops) if self.stops else text

    def _score(self, items, texts):
        names = dict.fromkeys(k for _, _, row in items for k in row)  # every column, in first-seen order
        cols = {k: [row.get(k) for _, _, row in items] for k in names}
        return rewards_lib.score(self.fns, [p for _, p, _ in items], texts, cols)

    # --- held-out evaluation --------------------------------------------------------------------------------

    def evaluate(self):
        """The held-out greedy reward of the current parameters: eval/reward and eval/rewards/<name>."""
        if not self.eval:
            return {}
        out = self.sampler.sample([ids for ids, _, _ in self.eval], self.max_new, temperature=0.0,
                                  stop=self.stops or None, params=self.params())
        texts = [self._text(t) for t in out.tokens]
        table = np.asarray(self._score(self.eval, texts), np.float64)
        reward = np.nansum(table * self.weights[:, None], axis=0)
        self.eval_texts = texts
        logging.info('held-out greedy reward %.4f on %d prompts', reward.mean(), len(texts))
        return {'eval/reward': float(reward.mean()),
                **{f'eval/rewards/{n}': float(np.nanmean(table[k])) for k, n in enumerate(self.names)}}


def _finite(x):
    return float(x) if np.isfinite(x) else None


def _seed(seed, rollout):
    """The sampling seed of rollout number `rollout` (fixed by train.seed: a resumed run samples the same)."""
    return int(np.random.default_rng([int(seed), int(rollout), 7]).integers(0, 2 ** 31 - 1))

