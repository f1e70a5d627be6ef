"""The `peft` LoRA adapter format (adapter_config.json + adapter_model.safetensors): its names, and import.

  load_peft_adapter(pre, adapter_dir)  a `peft` LoRA/DoRA adapter (and a classifier head it carries) on top
                                       of a loaded base; `ftjax.load_pretrained(path, adapter=DIR)` calls it.

`ftjax.export.export_peft` writes the same format with the names defined here. Tensors are read with numpy
(`safetensors.numpy`); never torch.
"""
import dataclasses
import json
import logging
import os
import re

import jax
import numpy as np
from flax import traverse_util

from ftjax.errors import MissingFileError, ModelError
from ftjax.models import convert
from ftjax.models.adapters import MAGNITUDE, LoraSpec, adapted_paths
from ftjax.models.loading import Pretrained
from ftjax.peft.lora import add_lora

PEFT_PREFIX = 'base_model.model.'  # what `peft` puts before the transformers module names
LORA_TENSORS = {'lora_a': 'lora_A.weight', 'lora_b': 'lora_B.weight', MAGNITUDE: 'lora_magnitude_vector'}
UNSUPPORTED_PEFT = {  # adapter_config.json key -> value ftjax can represent
    'rank_pattern': {}, 'alpha_pattern': {}, 'bias': 'none', 'lora_bias': False, 'layers_to_transform': None,
    'target_parameters': None, 'trainable_token_indices': None, 'use_qalora': False, 'alora_invocation_tokens': None}


def peft_task(cfg):
    """adapter_config.json's task_type for a model config."""
    if cfg.family == 'llama':
        return 'CAUSAL_LM'
    return 'SEQ_CLS' if cfg.num_labels else 'FEATURE_EXTRACTION'


def read_adapter(adapter_dir):
    """(adapter_config dict, {name: float32 numpy array}) of a peft adapter directory."""
    from safetensors.numpy import load_file
    cfg_file = os.path.join(adapter_dir, 'adapter_config.json')
    weights = os.path.join(adapter_dir, 'adapter_model.safetensors')
    if not os.path.exists(cfg_file):
        raise MissingFileError(f"model.adapter={adapter_dir!r}: no adapter_config.json; pass a directory written by "
                               f"peft's save_pretrained (or ftjax export --format=peft), or a ftjax run's workdir.")
    if not os.path.exists(weights):
        bin_hint = (' It holds adapter_model.bin: re-save it with save_pretrained(..., safe_serialization=True).'
                    if os.path.exists(os.path.join(adapter_dir, 'adapter_model.bin')) else '')
        raise MissingFileError(f"model.adapter={adapter_dir!r}: no adapter_model.safetensors.{bin_hint}")
    try:
        with open(cfg_file) as f:
            acfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{cfg_file}: not valid JSON ({e}); save the adapter again.") from e
    if not isinstance(acfg, dict) or acfg.get('peft_type') != 'LORA':
        kind = acfg.get('peft_type') if isinstance(acfg, dict) else type(acfg).__name__
        raise ModelError(f"{cfg_file}: peft_type {kind!r} is not supported; ftjax imports LoRA "
                         f"adapters (peft_type 'LORA', with or without use_dora) only.")
    for key, ok in UNSUPPORTED_PEFT.items():
        if acfg.get(key) not in (None, {}, [], False) and acfg.get(key) != ok:
            raise ModelError(f"{cfg_file}: {key}={acfg[key]!r} is not supported by ftjax (it needs {key}={ok!r}).")
    for key in ('r', 'lora_alpha'):
        if not isinstance(acfg.get(key), (int, float)) or isinstance(acfg.get(key), bool) or acfg[key] <= 0:
            raise ModelError(f"{cfg_file}: {key}={acfg.get(key)!r}; a LoRA adapter_config.json has a positive {key}.")
    try:
        tensors = load_file(weights)
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) for a bad file
        raise ModelError(f"{weights}: cannot read the safetensors file ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); save the adapter again.") from e
    return acfg, {k: np.asarray(v, np.float32) for k, v in tensors.items()}


def load_peft_adapter(pre: Pretrained, adapter_dir) -> Pretrained:
    """`pre` with the peft LoRA/DoRA adapter of `adapter_dir` added (and a classifier head it carries)."""
    cfg = pre.config
    if cfg.lora is not None:
        raise ModelError(f"{adapter_dir}: the model already has LoRA adapters; load the adapter on a base model.")
    acfg, tensors = read_adapter(adapter_dir)
    where = f"{adapter_dir} (trained on {acfg.get('base_model_name_or_path')!r}, loading onto {pre.path!r})"
    if acfg.get('task_type') == 'SEQ_CLS' and not getattr(cfg, 'num_labels', None):
        raise ModelError(f"{where}: a sequence-classification adapter (task_type SEQ_CLS) needs a classifier: load "
                         f"an encoder base with num_labels=N (model.num_labels)." if cfg.family == 'bert' else
                         f"{where}: a sequence-classification adapter (task_type SEQ_CLS); ftjax tunes decoders as "
                         f"language models only (task_type CAUSAL_LM).")
    rows, head = convert.hf_rows(cfg)
    arch = convert.architecture(cfg, pre.hf_config)
    modules = {p: t for p, t in convert.linear_modules(rows + head).items()
               if p != ('classifier',)}  # ftjax: no LoRA there
    lookup = {name: (path, i) for path, t in modules.items()
              for i, name in convert.layer_names(t, cfg.num_layers)}
    if cfg.family == 'bert':  # an encoder adapter (no 'bert.' prefix) also fits a classifier, and the other way
        other = convert.linear_modules(convert.bert_table(cfg, '' if cfg.num_labels else f'{cfg.model_type}.'))
        lookup.update({name: (path, i) for path, t in other.items()
                       for i, name in convert.layer_names(t, cfg.num_layers)})
    found, head_tensors = {}, {}
    for key, arr in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else None
        m = re.fullmatch(r'(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)', name or '')
        if name is None or (m is None and name not in {r[1] for r in head}):
            raise ModelError(f"{where}: tensor {key!r} is not a LoRA tensor of this {arch} (nor its "
                             f"classification head). Is the adapter from another base model?")
        if m is None:
            head_tensors[name] = arr
        elif m[1] not in lookup:
            raise ModelError(f"{where}: the adapter targets module {m[1]!r}, which this {arch} does not "
                             f"have. Is the adapter from another base model?")
        else:
            found.setdefault(lookup[m[1]][0], {})[(lookup[m[1]][1], m[2])] = arr
    if not found:
        raise ModelError(f"{where}: adapter_model.safetensors holds no lora_A/lora_B tensors.")
    spec = LoraSpec(rank=int(acfg['r']), alpha=float(acfg['lora_alpha']),
                    targets=tuple('^' + re.escape('/'.join(p)) + '$' for p in sorted(found)),
                    dropout=float(acfg.get('lora_dropout') or 0.0), rslora=bool(acfg.get('use_rslora')),
                    dora=bool(acfg.get('use_dora')))
    out = add_lora(pre, spec, jax.random.key(0))
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
            stored = one if leaf == MAGNITUDE else one[::-1]  # peft's: A [r, in], B [out, r]
            layers = []
            for i, name in convert.layer_names(template, cfg.num_layers):
                key = f'{PEFT_PREFIX}{name}.{suffix}'
                if (i, suffix) not in parts:
                    raise ModelError(f"{where}: missing tensor {key!r}" + (
                        " (ftjax adapts a module in every layer; layers_to_transform is not supported)."
                        if '{i}' in template else '.'))
                t = parts[(i, suffix)]
                if t.shape != tuple(stored):
                    raise ModelError(f"{where}: tensor {key!r} has shape {t.shape}, but this model with "
                                     f"r={spec.rank} expects {tuple(stored)}. Is the adapter from another base model?")
                layers.append(t if leaf == MAGNITUDE else t.T)
            arr = np.stack(layers) if '{i}' in template else layers[0]
            flat[path + (leaf,)] = arr
        if not spec.dora and any(s == 'lora_magnitude_vector' for _, s in parts):
            raise ModelError(f"{where}: lora_magnitude_vector tensors but use_dora is false in adapter_config.json.")
    if head_tensors:
        if not cfg.num_labels:
            raise ModelError(f"{where}: the adapter carries a classification head ({sorted(head_tensors)}); load the "
                             f"base with num_labels=N (model.num_labels) to use it.")
        rows_present = [r for r in head if r[1] in head_tensors]
        expected = traverse_util.unflatten_dict(flat)
        new = convert.hf_to_params(head_tensors, rows_present, expected, cfg.num_layers, where)
        flat.update(traverse_util.flatten_dict(new))
    logging.info('Loaded a rank-%d %s adapter on %d modules from %s.', spec.rank, 'DoRA' if spec.dora else 'LoRA',
                 len(found), adapter_dir)
    return dataclasses.replace(out, params=traverse_util.unflatten_dict(flat))
