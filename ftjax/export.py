"""Export a fine-tuned model for transformers / vLLM / llama.cpp, or its LoRA adapter for `peft`; import adapters.

  python -m ftjax.export --workdir=DIR --out=DIR --format=hf|peft [--step=N] [--dtype=bfloat16|float32]

exports a training run's latest complete checkpoint (or step N); it only reads the workdir, so it is safe
beside a training that is still running, and a run trained on any mesh exports on a single host.

Python API:
  export_hf(pre, out_dir, dtype='float32')  merged weights (LoRA/DoRA folded in) as a Hugging Face directory:
      config.json, model.safetensors (sharded with model.safetensors.index.json above `max_shard_bytes`),
      the tokenizer files (chat template included) and, for decoders, generation_config.json.
  export_peft(pre, out_dir)  adapter_config.json + adapter_model.safetensors, named as `peft` saves them.
  load_peft_adapter(pre, adapter_dir)  the other way: a `peft` LoRA/DoRA adapter on top of a loaded base.

Weights are written and read with numpy (`safetensors.numpy`); never torch.
"""
import dataclasses
import json
import logging
import os
import re
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ftjax.models import convert
from ftjax.models.layers import LoraSpec
from ftjax.models.loading import Pretrained
from ftjax.peft import lora

DEFAULT_SHARD_BYTES = 5 * 2**30
PEFT_PREFIX = 'base_model.model.'  # what `peft` puts before the transformers module names
DECODERS = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM', 'qwen2': 'Qwen2ForCausalLM'}
ENCODERS = {'bert': 'Bert', 'roberta': 'Roberta'}
MODULES_TO_SAVE = {'bert': ('classifier', 'pooler'), 'roberta': ('classifier',)}  # the head, saved whole
LORA_TENSORS = {'lora_a': 'lora_A.weight', 'lora_b': 'lora_B.weight', 'lora_magnitude': 'lora_magnitude_vector'}
UNSUPPORTED_PEFT = {  # adapter_config.json key -> value ftjax can represent
    'rank_pattern': {}, 'alpha_pattern': {}, 'bias': 'none', 'lora_bias': False, 'layers_to_transform': None,
    'target_parameters': None, 'trainable_token_indices': None, 'use_qalora': False, 'alora_invocation_tokens': None}


# --- names: ftjax paths <-> the modules of the transformers class ------------------------------------------


def hf_rows(cfg):
    """(body rows, head rows) of (ftjax path, HF tensor name, kind), named as the exported transformers class."""
    if cfg.family == 'llama':
        return convert.llama_table(cfg), []
    if not cfg.num_labels:
        return convert.bert_table(cfg, ''), []
    if cfg.pooling != 'cls':
        raise ValueError(f"model.pooling={cfg.pooling!r}: transformers' {ENCODERS[cfg.model_type]}ForSequence"
                         f"Classification pools the first token, so a mean-pooling classifier has no Hugging Face "
                         f"equivalent to export to. Train with model.pooling='cls' to export it.")
    return convert.bert_table(cfg, f'{cfg.model_type}.'), convert.bert_head_table(cfg)


def linear_modules(rows):
    """{ftjax module path: HF module name} of the Dense layers; per-layer names keep their '{i}'."""
    return {path[:-1]: name[:-len('.weight')] for path, name, kind in rows
            if kind == convert.LINEAR and path[-1] == 'kernel'}


def layer_names(template, num_layers):
    """[(layer index or None, HF module name)] for one module template."""
    if '{i}' in template:
        return [(i, template.format(i=i)) for i in range(num_layers)]
    return [(None, template)]


def architecture(pre):
    cfg, model_type = pre.config, pre.hf_config.get('model_type', getattr(pre.config, 'model_type', None))
    if cfg.family == 'llama':
        return DECODERS.get(model_type, 'LlamaForCausalLM')
    return ENCODERS[model_type] + ('ForSequenceClassification' if cfg.num_labels else 'Model')


def peft_task(cfg):
    if cfg.family == 'llama':
        return 'CAUSAL_LM'
    return 'SEQ_CLS' if cfg.num_labels else 'FEATURE_EXTRACTION'


def peft_target_modules(all_modules, adapted):
    """Shortest dotted suffixes that select exactly `adapted` under peft's rule (name == t or endswith '.' + t)."""
    others = set(all_modules) - set(adapted)
    names = set()
    for module in adapted:
        parts = module.split('.')
        for depth in range(1, len(parts) + 1):
            suffix = '.'.join(parts[-depth:])
            if not any(o == suffix or o.endswith('.' + suffix) for o in others):
                names.add(suffix)
                break
    return sorted(names)


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _np_dtype(dtype):
    try:
        return np.dtype(jnp.dtype(dtype))
    except TypeError as e:
        raise ValueError(f"dtype={dtype!r}: use 'float32', 'bfloat16' or 'float16'.") from e


def _prepare_out_dir(out_dir):
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"Output directory {out_dir!r} is not empty; export into a new (or empty) directory "
                              f"so that no stale weight files are left beside the new ones.")
    os.makedirs(out_dir, exist_ok=True)


def _write_json(path, obj):
    with open(path, 'w') as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write('\n')


# --- export: merged Hugging Face directory ----------------------------------------------------------------


def export_hf(pre: Pretrained, out_dir, dtype='float32', max_shard_bytes=DEFAULT_SHARD_BYTES):
    """Writes `pre` (adapters merged) as a Hugging Face directory that `from_pretrained` loads; returns out_dir."""
    cfg = pre.config
    rows, head = hf_rows(cfg)
    np_dtype = _np_dtype(dtype)
    params = jax.device_get(lora.merge(pre.params, cfg.lora) if cfg.lora is not None else pre.params)
    tensors = {k: v.astype(np_dtype) for k, v in convert.params_to_hf(params, rows + head, cfg.num_layers).items()}
    _prepare_out_dir(out_dir)
    write_safetensors(tensors, out_dir, max_shard_bytes)
    _write_json(os.path.join(out_dir, 'config.json'), hf_config_dict(pre, np_dtype.name))
    if pre.tokenizer is not None:
        pre.tokenizer.save_pretrained(out_dir)
    else:
        logging.warning('%s: the model has no tokenizer; the export holds none.', pre.path)
    if cfg.family == 'llama':
        write_generation_config(pre, out_dir)
    logging.info('Exported %d tensors (%s) to %s.', len(tensors), np_dtype.name, out_dir)
    return out_dir


def write_safetensors(tensors, out_dir, max_shard_bytes, stem='model'):
    """model.safetensors, or model-0000k-of-0000n.safetensors + model.safetensors.index.json above the limit."""
    from safetensors.numpy import save_file
    shards, current, size = [], {}, 0
    for name, arr in tensors.items():
        if current and size + arr.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = arr
        size += arr.nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, f'{stem}.safetensors'), metadata={'format': 'pt'})
        return [f'{stem}.safetensors']
    files, weight_map = [], {}
    for k, shard in enumerate(shards):
        fname = f'{stem}-{k + 1:05d}-of-{len(shards):05d}.safetensors'
        save_file(shard, os.path.join(out_dir, fname), metadata={'format': 'pt'})
        weight_map.update({name: fname for name in shard})
        files.append(fname)
    total = sum(a.nbytes for a in tensors.values())
    _write_json(os.path.join(out_dir, f'{stem}.safetensors.index.json'),
                {'metadata': {'total_size': total}, 'weight_map': weight_map})
    return files


def hf_config_dict(pre, dtype_name):
    """The source config.json with the exported architecture, dtype, tying and labels set."""
    cfg = pre.config
    out = {k: v for k, v in pre.hf_config.items() if not k.startswith('_')}
    out['architectures'] = [architecture(pre)]
    out['dtype'] = out['torch_dtype'] = dtype_name  # transformers 5 reads `dtype`; vLLM and older ones `torch_dtype`
    if cfg.family == 'llama':
        out['tie_word_embeddings'] = bool(cfg.tie_embeddings)
    elif cfg.num_labels:
        id2label = {str(k): v for k, v in (out.get('id2label') or {}).items()}
        if len(id2label) != cfg.num_labels:
            id2label = {str(i): f'LABEL_{i}' for i in range(cfg.num_labels)}
        out['id2label'] = id2label
        out['label2id'] = {v: int(k) for k, v in id2label.items()}
    return out


def write_generation_config(pre, out_dir):
    """The source's generation_config.json, else one built from the config's special-token ids."""
    src = os.path.join(pre.path, 'generation_config.json') if os.path.isdir(pre.path or '') else ''
    if src and os.path.exists(src):
        shutil.copy(src, os.path.join(out_dir, 'generation_config.json'))
        return
    gen = {k: pre.hf_config.get(k) for k in ('bos_token_id', 'eos_token_id', 'pad_token_id')}
    if gen['eos_token_id'] is None and pre.tokenizer is not None:
        gen['eos_token_id'] = pre.tokenizer.eos_token_id
    _write_json(os.path.join(out_dir, 'generation_config.json'), {k: v for k, v in gen.items() if v is not None})


# --- export: the adapter alone, as `peft` saves it ---------------------------------------------------------


def adapted_paths(params):
    """Module paths (tuples) that hold a LoRA adapter, e.g. ('layers', 'q_proj')."""
    return sorted({p[:-1] for p in traverse_util.flatten_dict(params) if p[-1] == 'lora_a'})


def export_peft(pre: Pretrained, out_dir, dtype='float32'):
    """Writes the LoRA/DoRA adapter (and a classifier's head) for `peft.PeftModel.from_pretrained`; returns out_dir.

    A classifier's head (pooler + classifier) is new, so it goes in `modules_to_save`; an adapter on the pooler
    is merged into it first (peft never puts adapters inside `modules_to_save`).
    """
    cfg, spec = pre.config, pre.config.lora
    if spec is None:
        raise ValueError(f"{pre.path}: the model has no LoRA adapters (config.lora is None), so there is no adapter "
                         f"to export; export the full weights with export_hf (--format=hf).")
    rows, head = hf_rows(cfg)
    body, head_modules = linear_modules(rows), linear_modules(head)
    params = dict(pre.params)
    for top in {p[0] for p in head_modules}:  # fold head adapters in: the whole head is saved anyway
        params[top] = lora.merge({top: params[top]}, spec)[top]
    np_dtype = _np_dtype(dtype)
    adapted = adapted_paths(params)
    missing = [p for p in adapted if p not in body]
    if missing:
        raise ValueError(f"Adapters on {['/'.join(p) for p in missing]} have no transformers module to attach to.")
    tensors = {}
    for path in adapted:
        mod = jax.device_get(_get(params, path))
        for i, name in layer_names(body[path], cfg.num_layers):
            for leaf, suffix in LORA_TENSORS.items():
                if leaf in mod:
                    arr = np.asarray(mod[leaf] if i is None else mod[leaf][i])
                    arr = arr if leaf == 'lora_magnitude' else arr.T  # A: [r, in], B: [out, r], m: [out]
                    tensors[f'{PEFT_PREFIX}{name}.{suffix}'] = np.ascontiguousarray(arr.astype(np_dtype))
    if head:
        head_params = jax.device_get({k: params[k] for k in {r[0][0] for r in head}})
        tensors.update({PEFT_PREFIX + k: v.astype(np_dtype)
                        for k, v in convert.params_to_hf(head_params, head, cfg.num_layers).items()})
    everything = [n for t in body.values() for _, n in layer_names(t, cfg.num_layers)]
    if cfg.family == 'bert' and not cfg.num_labels:
        everything.append('pooler.dense')  # transformers' BertModel/RobertaModel has one; ftjax's encoder does not
    chosen = [n for p in adapted for _, n in layer_names(body[p], cfg.num_layers)]
    adapter_config = {
        'peft_type': 'LORA', 'task_type': peft_task(cfg),
        'base_model_name_or_path': pre.path, 'revision': None, 'inference_mode': True,
        'r': spec.rank, 'lora_alpha': spec.alpha, 'lora_dropout': spec.dropout, 'use_rslora': spec.rslora,
        'use_dora': spec.dora, 'target_modules': peft_target_modules(everything, chosen), 'bias': 'none',
        'fan_in_fan_out': False, 'init_lora_weights': True, 'layers_to_transform': None, 'layers_pattern': None,
        'rank_pattern': {}, 'alpha_pattern': {},
        'modules_to_save': list(MODULES_TO_SAVE[cfg.model_type]) if head else None,
    }
    _prepare_out_dir(out_dir)
    from safetensors.numpy import save_file
    save_file(tensors, os.path.join(out_dir, 'adapter_model.safetensors'), metadata={'format': 'pt'})
    _write_json(os.path.join(out_dir, 'adapter_config.json'), adapter_config)
    logging.info('Exported a rank-%d %s adapter (%d tensors) to %s.', spec.rank, 'DoRA' if spec.dora else 'LoRA',
                 len(tensors), out_dir)
    return out_dir


# --- import: a `peft` adapter on top of a loaded base ------------------------------------------------------


def read_adapter(adapter_dir):
    """(adapter_config dict, {name: float32 numpy array}) of a peft adapter directory."""
    from safetensors.numpy import load_file
    cfg_file = os.path.join(adapter_dir, 'adapter_config.json')
    weights = os.path.join(adapter_dir, 'adapter_model.safetensors')
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json; pass a directory written by peft's "
                                f"save_pretrained (or ftjax.export --format=peft).")
    if not os.path.exists(weights):
        bin_hint = (' It holds adapter_model.bin: re-save it with save_pretrained(..., safe_serialization=True).'
                    if os.path.exists(os.path.join(adapter_dir, 'adapter_model.bin')) else '')
        raise FileNotFoundError(f"{adapter_dir}: no adapter_model.safetensors.{bin_hint}")
    with open(cfg_file) as f:
        acfg = json.load(f)
    if acfg.get('peft_type') != 'LORA':
        raise ValueError(f"{cfg_file}: peft_type {acfg.get('peft_type')!r} is not supported; ftjax imports LoRA "
                         f"adapters (peft_type 'LORA', with or without use_dora) only.")
    for key, ok in UNSUPPORTED_PEFT.items():
        if acfg.get(key) not in (None, {}, [], False) and acfg.get(key) != ok:
            raise ValueError(f"{cfg_file}: {key}={acfg[key]!r} is not supported by ftjax (it needs {key}={ok!r}).")
    return acfg, {k: np.asarray(v, np.float32) for k, v in load_file(weights).items()}


def load_peft_adapter(pre: Pretrained, adapter_dir) -> Pretrained:
    """`pre` with the peft LoRA/DoRA adapter of `adapter_dir` added (and a classifier head it carries)."""
    cfg = pre.config
    if cfg.lora is not None:
        raise ValueError(f"{adapter_dir}: the model already has LoRA adapters; load the adapter on a base model.")
    acfg, tensors = read_adapter(adapter_dir)
    where = f"{adapter_dir} (trained on {acfg.get('base_model_name_or_path')!r}, loading onto {pre.path!r})"
    if acfg.get('task_type') == 'SEQ_CLS' and not getattr(cfg, 'num_labels', None):
        raise ValueError(f"{where}: a sequence-classification adapter (task_type SEQ_CLS) needs a classifier: load "
                         f"an encoder base with num_labels=N (model.num_labels)." if cfg.family == 'bert' else
                         f"{where}: a sequence-classification adapter (task_type SEQ_CLS); ftjax tunes decoders as "
                         f"language models only (task_type CAUSAL_LM).")
    rows, head = hf_rows(cfg)
    modules = {p: t for p, t in linear_modules(rows + head).items() if p != ('classifier',)}  # ftjax: no LoRA there
    lookup = {name: (path, i) for path, t in modules.items() for i, name in layer_names(t, cfg.num_layers)}
    if cfg.family == 'bert':  # an encoder adapter (no 'bert.' prefix) also fits a classifier, and the other way
        other = linear_modules(convert.bert_table(cfg, '' if cfg.num_labels else f'{cfg.model_type}.'))
        lookup.update({name: (path, i) for path, t in other.items() for i, name in layer_names(t, cfg.num_layers)})
    found, head_tensors = {}, {}
    for key, arr in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else None
        m = re.fullmatch(r'(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)', name or '')
        if name is None or (m is None and name not in {r[1] for r in head}):
            raise ValueError(f"{where}: tensor {key!r} is not a LoRA tensor of this {architecture(pre)} (nor its "
                             f"classification head). Is the adapter from another base model?")
        if m is None:
            head_tensors[name] = arr
        elif m[1] not in lookup:
            raise ValueError(f"{where}: the adapter targets module {m[1]!r}, which this {architecture(pre)} does not "
                             f"have. Is the adapter from another base model?")
        else:
            found.setdefault(lookup[m[1]][0], {})[(lookup[m[1]][1], m[2])] = arr
    if not found:
        raise ValueError(f"{where}: adapter_model.safetensors holds no lora_A/lora_B tensors.")
    spec = LoraSpec(rank=int(acfg['r']), alpha=float(acfg['lora_alpha']),
                    targets=tuple('^' + re.escape('/'.join(p)) + '$' for p in sorted(found)),
                    dropout=float(acfg.get('lora_dropout') or 0.0), rslora=bool(acfg.get('use_rslora')),
                    dora=bool(acfg.get('use_dora')))
    out = lora.add_lora(pre, spec, jax.random.key(0))
    if adapted_paths(out.params) != sorted(found):
        raise AssertionError(f"LoRA targets {spec.targets} adapted {adapted_paths(out.params)}, not {sorted(found)}.")
    flat = traverse_util.flatten_dict(out.params)
    for path, parts in found.items():
        template = modules[path]
        for leaf, suffix in LORA_TENSORS.items():
            if (path + (leaf,)) not in flat:
                continue
            want = flat[path + (leaf,)].shape
            one = want[1:] if '{i}' in template else want  # ours per layer: A [in, r], B [r, out], m [out]
            stored = one if leaf == 'lora_magnitude' else one[::-1]  # peft's: A [r, in], B [out, r]
            layers = []
            for i, name in layer_names(template, cfg.num_layers):
                key = f'{PEFT_PREFIX}{name}.{suffix}'
                if (i, suffix) not in parts:
                    raise ValueError(f"{where}: missing tensor {key!r}" + (
                        " (ftjax adapts a module in every layer; layers_to_transform is not supported)."
                        if '{i}' in template else '.'))
                t = parts[(i, suffix)]
                if t.shape != tuple(stored):
                    raise ValueError(f"{where}: tensor {key!r} has shape {t.shape}, but this model with "
                                     f"r={spec.rank} expects {tuple(stored)}. Is the adapter from another base model?")
                layers.append(t if leaf == 'lora_magnitude' else t.T)
            arr = np.stack(layers) if '{i}' in template else layers[0]
            flat[path + (leaf,)] = arr
        if not spec.dora and any(s == 'lora_magnitude_vector' for _, s in parts):
            raise ValueError(f"{where}: lora_magnitude_vector tensors but use_dora is false in adapter_config.json.")
    if head_tensors:
        if not cfg.num_labels:
            raise ValueError(f"{where}: the adapter carries a classification head ({sorted(head_tensors)}); load the "
                             f"base with num_labels=N (model.num_labels) to use it.")
        rows_present = [r for r in head if r[1] in head_tensors]
        expected = traverse_util.unflatten_dict(flat)
        new = convert.hf_to_params(head_tensors, rows_present, expected, cfg.num_layers, where)
        flat.update(traverse_util.flatten_dict(new))
    logging.info('Loaded a rank-%d %s adapter on %d modules from %s.', spec.rank, 'DoRA' if spec.dora else 'LoRA',
                 len(found), adapter_dir)
    return dataclasses.replace(out, params=traverse_util.unflatten_dict(flat))


# --- command line -----------------------------------------------------------------------------------------


def check_peft_run(pre, workdir, run_config=None):
    """`--format=peft` needs a LoRA/DoRA run that changed nothing but adapters (and a classifier's head)."""
    method = getattr(pre, 'method', None) or (run_config.peft.method if run_config is not None else None)
    if pre is None or pre.config.lora is None or method not in ('lora', 'dora'):
        raise ValueError(f"--format=peft exports LoRA adapters, but {workdir} is a peft.method={method!r} run: its "
                         f"base weights changed, which an adapter cannot carry. Export it with --format=hf "
                         f"(merged weights).")
    if run_config is not None:
        p = run_config.peft
        extra = [k for k, v in (('peft.trainable', list(p.get('trainable', []))), ('peft.norms', p.get('norms')),
                                ('peft.biases', p.get('biases')), ('peft.embeddings', p.get('embeddings')),
                                ('peft.last_n_blocks', p.get('last_n_blocks'))) if v]
        if extra:
            raise ValueError(f"--format=peft: {workdir} also trained {', '.join(extra)}, which a LoRA adapter cannot "
                             f"carry. Export it with --format=hf (merged weights).")


def export(workdir, out_dir, format='hf', step=None, dtype='float32'):
    """What the command line does: restores the run's checkpoint (latest complete one, or `step`) and exports it."""
    if format not in ('hf', 'peft'):
        raise ValueError(f"--format={format!r}: choose 'hf' (merged weights) or 'peft' (the adapter alone).")
    _np_dtype(dtype)
    from etils import epath
    if not epath.Path(workdir).is_dir():
        raise FileNotFoundError(f"--workdir={workdir!r} does not exist; pass the directory given to "
                                f"`python -m ftjax.train --workdir=...`.")
    run_config = None
    if (epath.Path(workdir) / 'config.json').exists():
        from ftjax.loop import load_workdir_config
        run_config = load_workdir_config(workdir)
    if format == 'peft' and run_config is not None and run_config.peft.method not in ('lora', 'dora'):
        check_peft_run(None, workdir, run_config)  # refuse before loading anything
    from ftjax.checkpoint import restore_for_export
    pre = restore_for_export(workdir, step)
    if format == 'peft':
        check_peft_run(pre, workdir, run_config)
        return export_peft(pre, out_dir, dtype)
    return export_hf(pre, out_dir, dtype)


def define_flags(flag_values=None):
    """The CLI's absl flags (on demand; `--workdir` is shared with ftjax.train when that is imported first)."""
    from absl import flags
    fv = flag_values if flag_values is not None else flags.FLAGS
    define = [('string', 'workdir', None, 'The training run to export (holds config.json and checkpoints/).'),
              ('string', 'out', None, 'Output directory (new or empty).'),
              ('enum', 'format', 'hf', 'hf: merged Hugging Face model; peft: the LoRA adapter alone.', ['hf', 'peft']),
              ('integer', 'step', None, 'Checkpoint step to export (default: the latest complete one).'),
              ('enum', 'dtype', 'float32', 'dtype of the exported tensors.', ['float32', 'bfloat16', 'float16'])]
    for kind, name, default, help_text, *choices in define:
        if name not in fv:
            getattr(flags, f'DEFINE_{kind}')(name, default, *choices, help_text, flag_values=fv)
    flags.mark_flags_as_required(['workdir', 'out'], flag_values=fv)
    return fv


def main(argv):
    from absl import app, flags
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments {argv[1:]}.")
    fv = flags.FLAGS
    try:
        out = export(fv.workdir, fv.out, fv.format, fv.step, fv.dtype)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
        sys.exit(f"ftjax.export: {e}")
    print(out)


if __name__ == '__main__':
    from absl import app
    define_flags()
    app.run(main)
