"""lm-evaluation-harness backend: the lm-eval model `ftjax` (loglikelihood, loglikelihood_rolling, generate_until).

  python -m ftjax evaluate --workdir=RUN --tasks=gsm8k_local --include_path=experiments/eval_tasks  # RUN/harness.json
  python -m ftjax evaluate --model=packaged:smollm2 --tasks=sst2_local --include_path=experiments/eval_tasks
  python -m ftjax harness --model ftjax --model_args pretrained=PATH_OR_GGUF[,workdir=RUN] --tasks T --include_path DIR

The last line is lm-eval's own command line (all its flags) with `ftjax` registered first. A plain `lm_eval
--model ftjax` cannot find it: lm-eval 0.4.13 looks models up in a fixed table (lm_eval/models/__init__.py) and
reads no entry points, and `--include_path` adds tasks only. In Python, `ftjax.eval.harness.register()` (or
importing `ftjax.eval.harness.FtjaxLM`) registers it for `lm_eval.simple_evaluate(model='ftjax', ...)`.

model_args (model `ftjax`):
  pretrained=PATH       a HF directory (a `python -m ftjax export` one too), .gguf file, hub name or packaged:NAME
  adapter=DIR           a PEFT LoRA adapter on top of `pretrained`;  dtype=float32|bfloat16|float16 (float32)
  workdir=RUN[,step=N]  a training run's fine-tuned model (base + adapter, or full weights) from its latest
                        complete checkpoint (or step N), in the run's dtypes; `pretrained` may be left out
  batch_size=8 (lm-eval's CLI: --batch_size), max_length (default: the model's max_position_embeddings),
  max_gen_toks=256, add_bos_token,
  prefix_token_id       as lm-eval's `hf` backend, whose tokenisation, truncation and stop handling are mirrored
  mesh_data=-1, mesh_fsdp=1, mesh_tensor=1   the device mesh (config.mesh.* of training); gen_chunk=16

The compute is `ftjax.infer.Sampler` (bucketed shapes, KV cache, the mesh). lm-eval, an optional extra
(`pip install 'ftjax[eval]'`), is imported when first used, so ftjax runs without it.

Local task files: `dataset_path: json` + `dataset_kwargs: {data_files: ...}` is plain lm-eval (paths absolute or
relative to the working directory); `custom_dataset: !function ftjax.eval.harness.local_dataset` also reads
`shared:NAME/FILE` and paths relative to the YAML file (experiments/eval_tasks/).
"""
import json
import logging
import os
import time

import jax
import jax.numpy as jnp

from ftjax import checkpoint, sharding
from ftjax.build import restore_for_export
from ftjax.data import locations
from ftjax.data import files as files_lib
from ftjax.errors import ConfigError, EnvironmentSetupError, MissingFileError
from ftjax.infer import Sampler
from ftjax.logs import Progress
from ftjax.models import packaged
from ftjax.models.loading import Pretrained
from ftjax.pretrained import load_pretrained
from ftjax.workdir import RunDir

NAME = 'ftjax'  # the lm-eval model name
_CLASS = []  # the lm-eval model class, made once by `register`
KNOWN_ARGS = ('pretrained', 'workdir', 'step', 'adapter', 'dtype', 'batch_size', 'max_batch_size', 'device',
              'max_length', 'max_gen_toks', 'add_bos_token', 'prefix_token_id', 'mesh', 'mesh_data', 'mesh_fsdp',
              'mesh_tensor', 'gen_chunk')


def _lm_eval():
    try:
        import lm_eval  # noqa: F401  (optional dependency: the `eval` extra)
    except ImportError as e:
        raise EnvironmentSetupError(f"lm-evaluation-harness is not installed ({e}); pip install 'ftjax[eval]' "
                                    f"(lm-eval, rouge-score, sacrebleu).") from e


def load_model(pretrained=None, workdir=None, step=None, adapter=None, dtype=None):
    """The `Pretrained` to evaluate: `pretrained` (+ `adapter`), or the fine-tuned model of the run `workdir`."""
    if workdir:
        if adapter or dtype:
            raise ConfigError(f"adapter= and dtype= go with pretrained=; with workdir={workdir} the run's config "
                              f"decides them (model.adapter, model.param_dtype).")
        base = RunDir(workdir).config().model.path
        if pretrained and os.path.abspath(packaged.resolve(pretrained)) != os.path.abspath(packaged.resolve(base)):
            raise ConfigError(f"pretrained={pretrained} is not the base model of workdir={workdir} ({base}, in its "
                              f"config.json); leave pretrained= out, the run names its base.")
        return restore_for_export(workdir, step)
    if step is not None:
        raise ConfigError(f'step={step} picks a checkpoint of a workdir=RUN; pretrained={pretrained} has none.')
    if not pretrained:
        raise ConfigError('model_args need pretrained=PATH (a HF directory, .gguf file, hub name or packaged:NAME) '
                          'or workdir=RUN (a training run).')
    return load_pretrained(pretrained, dtype=jnp.dtype(dtype or 'float32'), adapter=adapter)


class HarnessModel:
    """The methods of the lm-eval model `ftjax`; `register()` mixes them into lm-eval's `TemplateLM`.

    `pretrained` may also be a loaded `Pretrained` (the trainer passes its fine-tuned model), and `mesh` a
    `jax.sharding.Mesh`."""

    def __init__(self, pretrained=None, workdir=None, step=None, adapter=None, dtype=None, batch_size=8,
                 max_batch_size=None, device=None, max_length=None, max_gen_toks=256, add_bos_token=None,
                 prefix_token_id=None, mesh=None, mesh_data=-1, mesh_fsdp=1, mesh_tensor=1, gen_chunk=16, **unknown):
        super().__init__()
        if unknown:
            raise ConfigError(f"model_args {sorted(unknown)} are not known to the ftjax backend; it takes "
                              f"{', '.join(KNOWN_ARGS)}.")
        self.step = checkpoint.pick_complete_step(workdir, step)[0] if workdir else step
        pre = pretrained if isinstance(pretrained, Pretrained) else load_model(pretrained, workdir, self.step,
                                                                               adapter, dtype)
        if pre.tokenizer is None:
            raise ConfigError(f'{pre.path}: the model has no tokenizer; lm-eval tasks are text.')
        if isinstance(batch_size, str):  # lm-eval's 'auto' / 'auto:N' (no memory probing here)
            batch_size = 8 if batch_size.startswith('auto') else int(batch_size)
        self.pre, self.tokenizer = pre, pre.tokenizer
        self.add_bos_token, self.custom_prefix_token_id = add_bos_token, prefix_token_id
        self._max_length, self._max_gen_toks = max_length, int(max_gen_toks)
        self.engine = Sampler(pre, batch_size=int(batch_size), chunk=int(gen_chunk),
                              mesh=mesh if mesh is not None else _mesh(mesh_data, mesh_fsdp, mesh_tensor))
        self.source = str(workdir or pre.path or pretrained)

    # --- what lm-eval's TemplateLM asks -------------------------------------------------------------------

    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self):
        """The token before a continuation with an empty context (as `hf`: the custom one, BOS, else EOS)."""
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self):
        return int(self._max_length or self.pre.config.max_position_embeddings)

    @property
    def max_gen_toks(self):
        return self._max_gen_toks

    @property
    def tokenizer_name(self):
        return str(getattr(self.tokenizer, 'name_or_path', '') or self.source).replace('/', '__')

    def get_model_info(self):
        return {'model_source': self.source, 'model_dtype': str(jnp.dtype(self.pre.config.param_dtype)),
                'model_num_parameters': sum(int(x.size) for x in jax.tree.leaves(self.pre.params)),
                'mesh': dict(self.engine.mesh.shape)}

    def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
        """As `hf`: the tokenizer's own special tokens unless `add_bos_token` says, none when the string already
        starts with the prefix token."""
        kw = {'add_special_tokens': add_special_tokens} if add_special_tokens is not None else (
            {'add_special_tokens': self.add_bos_token} if self.add_bos_token is not None else {})
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            kw['add_special_tokens'] = False
        ids = self.tokenizer.encode(string, **kw)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens=True):
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _prompt_ids(self, context, max_ctx_len):
        """A generation prompt's ids as `hf`'s batch encoding: no special tokens if it starts with BOS."""
        bos = getattr(self.tokenizer, 'bos_token', None)
        kw = ({'add_special_tokens': False} if bos is not None and context.startswith(bos) else
              {'add_special_tokens': self.add_bos_token} if self.add_bos_token is not None else {})
        return self.tokenizer(context, **kw)['input_ids'][-max_ctx_len:]

    def _progress(self, desc, total, disable):
        return None if disable or not total else Progress(desc, total, unit='requests', min_interval_s=10.0)

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        """requests: [((context, continuation) or None, context_ids, continuation_ids)] -> [(logprob, greedy)]."""
        progress = self._progress('loglikelihood', len(requests), disable_tqdm)
        out = self.engine.loglikelihoods([(ctx, cont) for _, ctx, cont in requests], self.max_length,
                                         on_batch=progress.update if progress else None)
        if progress:
            progress.close()
        for (key, _, _), answer in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial('loglikelihood', key, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """Each string's total log-likelihood over lm-eval's disjoint rolling windows of max_length tokens."""
        from lm_eval import utils as lm_utils

        windows = []  # (request index, context ids, continuation ids)
        for i, (string,) in enumerate(r.args for r in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((i, ctx, cont))
        scores = self._loglikelihood_tokens([(None, ctx, cont) for _, ctx, cont in windows], disable_tqdm)
        totals = [0.0] * len(requests)
        for (i, _, _), (logp, _) in zip(windows, scores):
            totals[i] += logp
        for r, total in zip(requests, totals):
            self.cache_hook.add_partial('loglikelihood_rolling', r.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm=False):
        """Greedy (or sampled, with do_sample) answers cut at the first stop string, as `hf`: requests grouped by
        their generation kwargs, longest prompts first, prompts left-truncated to max_length - max_gen_toks."""
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        args = [r.args for r in requests]
        groups = {}
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        out = [None] * len(args)
        progress = self._progress('generate_until', len(args), disable_tqdm)
        done = 0
        for idx in groups.values():
            kwargs = dict(normalize_gen_kwargs(args[idx[0]][1], self.max_gen_toks))
            until = handle_stop_sequences(kwargs.pop('until', None), eos=eos)
            max_gen = int(kwargs.pop('max_gen_toks'))
            if self.max_length - max_gen <= 0:
                raise ConfigError(f'max_gen_toks={max_gen} leaves no room for a prompt in max_length='
                                  f'{self.max_length}; lower max_gen_toks or raise max_length in model_args.')
            sample = bool(kwargs.get('do_sample')) and float(kwargs.get('temperature', 0.0)) > 0
            prompts = {i: self._prompt_ids(args[i][0], self.max_length - max_gen) for i in idx}
            order = sorted(idx, key=lambda i: -len(prompts[i]))

            def stop(_, ids, until=until):  # asked every gen_chunk tokens; the text is cut at the stop below
                text = self.tok_decode(ids)
                return any(s and s in text for s in until)

            new = self.engine.sample(
                [prompts[i] for i in order], max_gen, stop=stop,
                temperature=float(kwargs.get('temperature', 0.0)) if sample else 0.0,
                top_k=int(kwargs.get('top_k') or 0), top_p=float(kwargs.get('top_p') or 1.0),
                seed=int(kwargs.get('seed') or 0),
                on_batch=(lambda n, base=done: progress.update(base + n)) if progress else None).tokens
            for i, ids in zip(order, new):
                out[i] = postprocess_generated_text(self.tok_decode(ids), until, None)
                self.cache_hook.add_partial('generate_until', args[i], out[i])
            done += len(idx)
        if progress:
            progress.close()
        return out

    def apply_chat_template(self, chat_history, add_generation_prompt=True):
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)


def _mesh(data, fsdp, tensor):
    return sharding.make_mesh({'data': int(data), 'fsdp': int(fsdp), 'tensor': int(tensor)})


def register():
    """The lm-eval model class `FtjaxLM` (HarnessModel on lm-eval's TemplateLM), registered as 'ftjax'."""
    if not _CLASS:
        _lm_eval()
        import lm_eval.models  # noqa: F401  (lm-eval's own table first: get_model skips it once 'ftjax' is in)
        from lm_eval.api.model import TemplateLM
        from lm_eval.api.registry import model_registry, register_model

        if NAME in model_registry:  # registered before (by another copy of this module)
            _CLASS.append(model_registry.get(NAME))
        else:
            cls = type('FtjaxLM', (HarnessModel, TemplateLM), {'__module__': __name__, '__doc__': HarnessModel.__doc__})
            _CLASS.append(register_model(NAME)(cls))
    return _CLASS[0]


def __getattr__(name):  # `from ftjax.eval.harness import FtjaxLM`: made (and registered) on first use
    if name == 'FtjaxLM':
        return register()
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


# --- running tasks and keeping the results -------------------------------------------------------------------


def _task_specs(tasks):
    """Task names, or YAML files (read as lm-eval's CLI reads a `--tasks file.yaml`)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    specs = []
    for t in ([tasks] if isinstance(tasks, str) else list(tasks)):
        for name in filter(None, (x.strip() for x in str(t).split(','))):
            if name.endswith(('.yaml', '.yml')):
                if not os.path.isfile(name):
                    raise MissingFileError(f'task file {name} does not exist (relative to {os.getcwd()}).')
                specs.append(load_yaml(name, resolve_func=True))
            else:
                specs.append(name)
    if not specs:
        raise ConfigError('no tasks given: name lm-eval tasks (or task YAML files), e.g. --tasks=gsm8k_local.')
    return specs


def find_tasks(tasks, include_path=None):
    """(lm-eval TaskManager, task specs): `tasks` are names (of lm-eval's tasks or of YAMLs under `include_path`,
    a directory or a list) or YAML files; an unknown name is one line. lm-eval's own ~15k task files are indexed
    (~10-30 s) only when a name is not under include_path."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    include = [include_path] if isinstance(include_path, str) else list(include_path or [])
    for path in include:
        if not os.path.isdir(path):
            raise MissingFileError(f'include_path {path} is not a directory of task YAML files.')
    specs = _task_specs(tasks)
    names = [t for t in specs if isinstance(t, str)]
    manager = TaskManager(include_path=include or None, include_defaults=False)
    if not all(manager.match_tasks([t]) for t in names):
        manager = TaskManager(include_path=include or None)
    missing = [t for t in names if not manager.match_tasks([t])]
    if missing:
        raise ConfigError(f"unknown lm-eval task(s) {missing}" + (f' (include_path: {include})' if include else
                          '; local tasks need include_path, e.g. experiments/eval_tasks') + '.')
    return manager, specs


def run_tasks(lm, tasks, include_path=None, limit=None, num_fewshot=None, log_samples=False, found=None, **kwargs):
    """lm-eval's `simple_evaluate` with the model `lm` (an FtjaxLM or any lm-eval model) on `tasks` (`find_tasks`,
    or `found`: what it returned). `kwargs` go to simple_evaluate. Returns lm-eval's results dict."""
    from lm_eval import simple_evaluate

    manager, specs = found or find_tasks(tasks, include_path)
    return simple_evaluate(model=lm, tasks=specs, task_manager=manager, limit=limit or None,
                           num_fewshot=num_fewshot, log_samples=log_samples, **kwargs)


def summarize(results):
    """{'task/metric': value} (and 'task/metric/filter' for filters other than 'none'); stderrs and sample counts
    left out."""
    flat = {}
    for task, metrics in (results or {}).get('results', {}).items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(',')
            if metric in ('alias', 'sample_len') or metric.endswith('_stderr') or not isinstance(value, (int, float)):
                continue
            flat[f'{task}/{metric}' + (f'/{filt}' if filt and filt != 'none' else '')] = value
    return flat


def write_results(path, results, **meta):
    """`path` (e.g. RUN/harness.json): the summary, lm-eval's results and configs, and `meta` (model, step, ...);
    the samples, when logged, beside it as <name>_samples.jsonl. Returns the summary."""
    from lm_eval.utils import handle_non_serializable

    summary = summarize(results)
    doc = dict(meta, summary=summary, **{k: results.get(k) for k in ('results', 'n-samples', 'versions',
                                                                       'configs', 'config') if k in results})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(doc, f, indent=1, default=handle_non_serializable)
    os.replace(tmp, path)
    if results.get('samples'):
        with open(os.path.splitext(path)[0] + '_samples.jsonl', 'w') as f:
            for task, samples in results['samples'].items():
                for s in samples:
                    f.write(json.dumps(dict(task=task, **s), default=handle_non_serializable) + '\n')
    return summary


def evaluate_model(pretrained, tasks, out=None, include_path=None, limit=None, num_fewshot=None, batch_size=8,
                   log_samples=False, mesh=None, meta=None, evaluate_kwargs=None, **model_args):
    """Loads (or takes) the model, runs `tasks`, prints lm-eval's table and writes `out` (on process 0).
    `pretrained`: a path / `Pretrained`, or None with model_args workdir=RUN; `evaluate_kwargs` go to lm-eval's
    simple_evaluate (apply_chat_template, bootstrap_iters, ...). Returns (results, summary)."""
    start = time.time()
    found = find_tasks(tasks, include_path)  # a wrong task name fails before the model loads
    lm = register()(pretrained=pretrained, batch_size=batch_size, mesh=mesh, **model_args)
    results = run_tasks(lm, tasks, limit=limit, num_fewshot=num_fewshot, log_samples=log_samples, found=found,
                        **(evaluate_kwargs or {}))
    summary = summarize(results)
    if jax.process_index() == 0:
        from lm_eval.utils import make_table

        print(make_table(results), flush=True)
        if out:
            info = dict(model=lm.source, step=lm.step, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                        wall_s=time.time() - start)
            write_results(out, results, **dict(info, **(meta or {})))
            logging.info('Harness results written to %s', out)
    return results, summary


def workdir_results(workdir):
    """The summary in `workdir/harness.json`, or {} when there is none."""
    return RunDir(workdir).harness_summary()


# --- local task data -----------------------------------------------------------------------------------------


def local_dataset(data_files=None, config_source=None, **_metadata):
    """lm-eval `custom_dataset` for task YAMLs on local files:
    `custom_dataset: !function ftjax.eval.harness.local_dataset`
    with `dataset_kwargs: {data_files: {test: shared:gsm8k/test.jsonl, train: ...}}`. A path is `shared:NAME/FILE`
    (ftjax.data.locations: $FTJAX_DATA or ../shared/data), absolute, or relative to the YAML file (lm-eval passes
    its path as metadata `config_source`). .json/.jsonl, .csv and .tsv (GLUE's: no quoting) are read."""
    import datasets

    where = config_source or 'the task YAML'
    if not data_files:
        raise ConfigError(f'{where}: custom_dataset ftjax.eval.harness.local_dataset needs dataset_kwargs.data_files '
                          f'({{split: file}}).')
    base = os.path.dirname(os.path.abspath(config_source)) if config_source and os.path.isfile(config_source) \
        else os.getcwd()
    files = data_files if isinstance(data_files, dict) else {'train': data_files}
    resolved, kinds = {}, set()
    for split, value in files.items():
        path = locations.resolve(value, f'{where}: dataset_kwargs.data_files.{split}')
        path = path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))
        if not os.path.isfile(path):
            raise MissingFileError(f'{where}: dataset_kwargs.data_files.{split}={value!r} is not a file ({path}); '
                                   f'paths are shared:NAME/FILE, absolute, or relative to the YAML file.')
        kind = {'.json': 'json', '.jsonl': 'json', '.csv': 'csv', '.tsv': 'tsv'}.get(os.path.splitext(path)[1])
        if kind is None:
            raise ConfigError(f'{where}: {path} is not a .json/.jsonl/.csv/.tsv file.')
        files_lib.check_file(path, kind)
        resolved[split], kinds = path, kinds | {kind}
    if len(kinds) > 1:
        raise ConfigError(f'{where}: dataset_kwargs.data_files mixes file types {sorted(kinds)}; use one.')
    kind = kinds.pop()
    if kind == 'json':
        return datasets.load_dataset('json', data_files=resolved)
    delimiter, quoting = files_lib.csv_dialect(kind)
    return datasets.load_dataset('csv', data_files=resolved, delimiter=delimiter, quoting=quoting,
                                 encoding='utf-8-sig', na_filter=False)
