"""Export a fine-tuned model for transformers / vLLM / llama.cpp, or its LoRA adapter for `peft`.

  python -m ftjax export --workdir=DIR --out=DIR --format=hf|peft [--step=N] [--dtype=bfloat16|float32]

exports a training run's latest complete checkpoint (or step N); it only reads the workdir, so it is safe
beside a training that is still running, and a run trained on any mesh exports on a single host. A base
model read from a quantized GGUF file is exported dequantized (float32 unless --dtype says otherwise);
the export says so, with both sizes. A run on a quantized base (`model.quantize`) exports `--format=peft` as
any LoRA run, and `--format=hf` merges its adapters into the dequantized base (one line says so). The command:
ftjax/cli/export.py.

Python API:
  export_hf(pre, out_dir, dtype='float32')  merged weights (LoRA/DoRA folded in) as a Hugging Face directory:
      config.json, model.safetensors (sharded with model.safetensors.index.json above `max_shard_bytes`),
      the tokenizer files (chat template included) and, for decoders, generation_config.json.
  export_peft(pre, out_dir)  adapter_config.json + adapter_model.safetensors, named as `peft` saves them
      (the other way: `ftjax.load_pretrained(path, adapter=DIR)`, `ftjax.peft.adapter_io`).

Weights are written and read with numpy (`safetensors.numpy`); never torch.
"""
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from ftjax import build
from ftjax.errors import ConfigError, MissingFileError, ModelError, OutputExistsError
from ftjax.models import adapters, convert, gguf_io, quantize
from ftjax.models.convert import hf_rows, layer_names, linear_modules
from ftjax.models.loading import Pretrained
from ftjax.peft.adapter_io import LORA_TENSORS, PEFT_PREFIX, peft_task
from ftjax.tree import get_path
from ftjax.workdir import RunDir

DEFAULT_SHARD_BYTES = 5 * 2**30
MODULES_TO_SAVE = {'bert': ('classifier', 'pooler'), 'roberta': ('classifier',)}  # the head, saved whole


# --- names and files --------------------------------------------------------------------------------------


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


def _np_dtype(dtype):
    try:
        return np.dtype(jnp.dtype(dtype))
    except TypeError:
        raise ConfigError(f"dtype={dtype!r}: use 'float32', 'bfloat16' or 'float16'.") from None


def _prepare_out_dir(out_dir):
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise OutputExistsError(f"--out={out_dir}: the directory is not empty; export into a new (or empty) "
                                f"directory so that no stale weight files are left beside the new ones.")
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
    params = pre.params
    kinds = quantize.kinds_in(params)  # a run on a quantized base (model.quantize): adapters trained on it
    if kinds:
        params = quantize.dequantize_tree(params)
    params = jax.device_get(adapters.merge(params, cfg.lora) if cfg.lora is not None else params)
    tensors = {k: v.astype(np_dtype) for k, v in convert.params_to_hf(params, rows + head, cfg.num_layers).items()}
    _prepare_out_dir(out_dir)
    export_bytes = sum(a.nbytes for a in tensors.values())
    note = dequantization_note(pre.path, export_bytes, np_dtype)
    if kinds:
        note = (f"the run's base was quantized ({'/'.join(kinds)}, model.quantize): the export merges the adapters "
                f"into its dequantized weights, written as {np_dtype.name} (~{_size(export_bytes)})"
                f"{'; pass --dtype=bfloat16 to halve it' if np_dtype.itemsize == 4 else ''}.")
    if note:
        logging.info('%s', note)
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


def dequantization_note(path, export_bytes, np_dtype):
    """One line when the base model came from a quantized GGUF file (the export holds its weights
    dequantized, several times larger), else None."""
    if not str(path or '').endswith('.gguf') or not os.path.isfile(path):
        return None
    kinds = gguf_io.quantization(path)
    if not kinds:
        return None
    note = (f'the base was a {kinds[0]} GGUF ({_size(os.path.getsize(path))}); the export holds its weights '
            f'dequantized to {np_dtype.name} (~{_size(export_bytes)})')
    if np_dtype.itemsize == 4:
        note += '; pass --dtype=bfloat16 to halve it'
    return note + '.'


def _size(nbytes):
    for unit, size in (('GB', 1e9), ('MB', 1e6), ('KB', 1e3)):
        if nbytes >= size:
            return f'{nbytes / size:.0f} {unit}' if nbytes >= 10 * size else f'{nbytes / size:.1f} {unit}'
    return f'{nbytes} B'


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
    out['architectures'] = [convert.architecture(cfg, pre.hf_config)]
    out['dtype'] = out['torch_dtype'] = dtype_name  # transformers 5 reads `dtype`; vLLM and older ones `torch_dtype`
    if cfg.family == 'llama':
        out.update(cfg.to_hf(out))  # what the source lacks (a config read from GGUF metadata)
        out['model_type'] = cfg.model_type
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


def export_peft(pre: Pretrained, out_dir, dtype='float32'):
    """Writes the LoRA/DoRA adapter (and a classifier's head) for `peft.PeftModel.from_pretrained`; returns out_dir.

    A classifier's head (pooler + classifier) is new, so it goes in `modules_to_save`; an adapter on the pooler
    is merged into it first (peft never puts adapters inside `modules_to_save`).
    """
    cfg, spec = pre.config, pre.config.lora
    if spec is None:
        raise ConfigError(f"{pre.path}: the model has no LoRA adapters (config.lora is None), so there is no "
                          f"adapter to export; export the full weights with export_hf (--format=hf).")
    rows, head = hf_rows(cfg)
    body, head_modules = linear_modules(rows), linear_modules(head)
    params = dict(pre.params)
    for top in {p[0] for p in head_modules}:  # fold head adapters in: the whole head is saved anyway
        params[top] = adapters.merge({top: params[top]}, spec)[top]
    np_dtype = _np_dtype(dtype)
    adapted = adapters.adapted_paths(params)
    experts = [p for p in adapted if p[:2] == ('layers', 'moe') and p[-1] in EXPERT_PROJECTIONS]
    adapted = [p for p in adapted if p not in experts]
    missing = [p for p in adapted if p not in body]
    if missing:
        raise ModelError(f"Adapters on {['/'.join(p) for p in missing]} have no transformers module to attach to; "
                         f"export the merged weights with --format=hf.")
    # experts: one rank for every target (gate and up fused: 2 x rank), ftjax's scale folded into each B
    rank = 2 * spec.rank if any(p[-1] in ('gate_proj', 'up_proj') for p in experts) else spec.rank
    tensors = {}
    for path in adapted:
        mod = jax.device_get(get_path(params, path))
        for i, name in layer_names(body[path], cfg.num_layers):
            for leaf, suffix in LORA_TENSORS.items():
                if leaf in mod:
                    arr = np.asarray(mod[leaf] if i is None else mod[leaf][i])
                    arr = arr if leaf == 'lora_magnitude' else arr.T  # A: [r, in], B: [out, r], m: [out]
                    if experts:
                        arr = _padded(arr * spec.scale if leaf == 'lora_b' else arr, rank, leaf == 'lora_b')
                    tensors[f'{PEFT_PREFIX}{name}.{suffix}'] = np.ascontiguousarray(arr.astype(np_dtype))
    target_parameters = None
    if experts:
        expert_tensors, target_parameters = _expert_adapters(params['layers']['moe'], cfg, spec, rank)
        tensors.update({k: v.astype(np_dtype) for k, v in expert_tensors.items()})
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
        'r': rank if experts else spec.rank, 'lora_alpha': rank if experts else spec.alpha,  # experts: scale 1
        'lora_dropout': spec.dropout, 'use_rslora': spec.rslora and not experts,
        'use_dora': spec.dora, 'target_modules': peft_target_modules(everything, chosen), 'bias': 'none',
        'fan_in_fan_out': False, 'init_lora_weights': True, 'layers_to_transform': None, 'layers_pattern': None,
        'rank_pattern': {}, 'alpha_pattern': {},
        'modules_to_save': list(MODULES_TO_SAVE[cfg.model_type]) if head else None,
    }
    if target_parameters:
        adapter_config['target_parameters'] = target_parameters
    _prepare_out_dir(out_dir)
    from safetensors.numpy import save_file
    save_file(tensors, os.path.join(out_dir, 'adapter_model.safetensors'), metadata={'format': 'pt'})
    _write_json(os.path.join(out_dir, 'adapter_config.json'), adapter_config)
    logging.info('Exported a rank-%d %s adapter (%d tensors) to %s.', spec.rank, 'DoRA' if spec.dora else 'LoRA',
                 len(tensors), out_dir)
    return out_dir


EXPERT_PROJECTIONS = ('gate_proj', 'up_proj', 'gate_up_proj', 'down_proj')  # under params['layers']['moe']


def _padded(arr, rank, columns):
    """A LoRA factor with its rank axis (A [r, in]: rows; B [out, r]: `columns`) zero-padded to `rank` (exact)."""
    r = arr.shape[-1] if columns else arr.shape[-2]
    pad = [(0, 0)] * arr.ndim
    pad[-1 if columns else -2] = (0, rank - r)
    return np.pad(arr, pad)


def _expert_adapters(moe, cfg, spec, rank):
    """peft's LoRA of transformers 5's fused expert parameters (`target_parameters`: `gate_up_proj` [experts,
    2 mlp, embed] and `down_proj` [experts, embed, mlp], each wrapped by peft's ParamWrapper): ftjax's per-expert
    gate and up adapters fused into one of rank 2 x r (A stacked, B block-diagonal: exact), every factor padded to
    `rank` and B scaled by ftjax's alpha / r (the config's scale is then 1). peft flattens the experts into its
    lora_A [experts x rank, in] (expert-major) and lora_B [out, rank x experts] (expert-minor); nested wrappers:
    the last target is outermost, each earlier one one `base_layer.` deeper. -> ({name: array}, targets)."""
    def factors(name):  # (A [layers, experts, r, in], B [layers, experts, out, r] x scale) or None
        mod = moe.get(name, {})
        if 'lora_a' not in mod:
            return None
        a, b = (np.asarray(jax.device_get(mod[k]), np.float32) for k in ('lora_a', 'lora_b'))
        return a.swapaxes(-1, -2), b.swapaxes(-1, -2) * spec.scale
    gate_up = factors('gate_up_proj')
    gate, up = factors('gate_proj'), factors('up_proj')
    if gate or up:  # [gate; up] on the out axis, as transformers fuses them
        layers, experts, r = cfg.num_layers, cfg.num_experts, spec.rank
        d, f = cfg.hidden_size, cfg.moe_intermediate_size
        a, b = np.zeros((layers, experts, 2 * r, d), np.float32), np.zeros((layers, experts, 2 * f, 2 * r), np.float32)
        for k, part in enumerate((gate, up)):
            if part:
                a[:, :, k * r:(k + 1) * r], b[:, :, k * f:(k + 1) * f, k * r:(k + 1) * r] = part
        gate_up = a, b
    prefix = 'block_sparse_moe.experts' if cfg.model_type == 'granitemoe' else 'mlp.experts'
    targets = [(n, t) for n, t in (('gate_up_proj', gate_up), ('down_proj', factors('down_proj'))) if t]
    out = {}
    for depth, (name, (a, b)) in enumerate(targets):
        a, b = _padded(a, rank, False), _padded(b, rank, True)  # [layers, experts, rank, in], [.., out, rank]
        module = prefix + '.base_layer' * (len(targets) - 1 - depth)
        for i in range(cfg.num_layers):
            key = f'{PEFT_PREFIX}model.layers.{i}.{module}'
            out[f'{key}.lora_A.weight'] = np.ascontiguousarray(a[i].reshape(-1, a.shape[-1]))  # [experts x rank, in]
            out[f'{key}.lora_B.weight'] = np.ascontiguousarray(
                b[i].transpose(1, 2, 0).reshape(b.shape[-2], -1))  # [out, rank x experts]
    return out, [f'{prefix}.{name}' for name, _ in targets]


# --- a run's export -----------------------------------------------------------------------------------------


def check_peft_run(pre, workdir, run_config=None):
    """`--format=peft` needs a LoRA/DoRA run that changed nothing but adapters (and a classifier's head)."""
    method = getattr(pre, 'method', None) or (run_config.peft.method if run_config is not None else None)
    if pre is None or pre.config.lora is None or method not in ('lora', 'dora'):
        raise ConfigError(f"--format=peft exports LoRA adapters, but {workdir} is a peft.method={method!r} run: its "
                          f"base weights changed, which an adapter cannot carry. Export it with --format=hf "
                          f"(merged weights).")
    if run_config is not None and run_config.model.adapter_merge:  # laid over the defaults (RunDir.config)
        raise ConfigError(f"--format=peft: {workdir} trained its adapter on the base with model.adapter="
                          f"{run_config.model.adapter!r} merged into it (model.adapter_merge), so it is no adapter of "
                          f"the base alone. Export it with --format=hf (merged weights).")
    if run_config is not None:
        p = run_config.peft
        extra = [k for k, v in (('peft.trainable', list(p.trainable)), ('peft.norms', p.norms),
                                ('peft.biases', p.biases), ('peft.embeddings', p.embeddings),
                                ('peft.last_n_blocks', p.last_n_blocks)) if v]
        if extra:
            raise ConfigError(f"--format=peft: {workdir} also trained {', '.join(extra)}, which a LoRA adapter "
                              f"cannot carry. Export it with --format=hf (merged weights).")


def export(workdir, out_dir, format='hf', step=None, dtype='float32'):
    """What the command line does: restores the run's checkpoint (latest complete one, or `step`) and exports it."""
    if format not in ('hf', 'peft'):
        raise ConfigError(f"--format={format!r}: choose 'hf' (merged weights) or 'peft' (the adapter alone).")
    _np_dtype(dtype)
    if not epath.Path(workdir).is_dir():
        raise MissingFileError(f"--workdir={workdir} does not exist; pass the directory given to "
                               f"`python -m ftjax train --workdir=...`.")
    run_config = None
    if RunDir(workdir).config_file.exists():
        run_config = RunDir(workdir).config()
    if format == 'peft' and run_config is not None and run_config.peft.method not in ('lora', 'dora'):
        check_peft_run(None, workdir, run_config)  # refuse before loading anything
    pre = build.restore_for_export(workdir, step)
    if format == 'peft':
        check_peft_run(pre, workdir, run_config)
        return export_peft(pre, out_dir, dtype)
    return export_hf(pre, out_dir, dtype)
