r"""Compile the train step for a mesh before renting it: does it compile, and what does a device hold?

  python -m ftjax compile_check --config=experiments/quickstart.py --topology=v5e:2x2
  python -m ftjax compile_check --config=experiments/quickstart.py --topology=data=4,fsdp=2,tensor=1

A TPU topology name (v5e:1x1 = one chip, v4:2x2x1, v5e:2x2, v5p:2x2x2, v6e:4x4, ...; needs libtpu:
`pip install -e '.[tpu]'`) runs the real TPU compiler with no TPU present: the mesh is `config.mesh` over that
topology's devices, `model.kernels='auto'` picks the TPU kernels (splash attention), and the report adds the chip's HBM,
whether the step fits, the compiled FLOPs and a roofline estimate of the step time and MFU. Mesh sizes
(data=4,...) instead set up data*fsdp*tensor fake CPU devices.

Either way it builds the model from the checkpoint's config.json (or the
GGUF metadata) with `jax.eval_shape` -- no weights are read --, applies the PEFT method, then lowers and
compiles the trainer's own train step (`build.jit_train_step`) with the trainer's shardings for that mesh.
Prints the per-device bytes of trainable params, frozen params and optimizer state, XLA's memory
analysis of the compiled step (arguments, outputs, temporaries, generated code), the collectives of the
compiled HLO (count and bytes per kind: `collective_bytes`), and a last line of JSON
(`summary_json`). `--config.model.quantize=nf4` (or int8) sizes a quantized frozen base (QLoRA) from the
shapes alone (`ftjax.models.quantize`; 'gguf' needs the file's blocks and is refused).
With fake CPU devices the XLA numbers are the CPU compiler's (TPU/GPU fuse differently:
an estimate); for a TPU topology they are the TPU compiler's own; the param and optimizer bytes are exact.
`--config.*` overrides apply as for `python -m ftjax train` (e.g. --config.train.batch_size=64). The command:
ftjax/cli/compile_check.py.
"""
import dataclasses
import functools
import json
import logging
import math
import os
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies

from ftjax import build, optim, peft, sharding
from ftjax.config import validate
from ftjax.data import layout
from ftjax.errors import ConfigError, EnvironmentSetupError, MissingFileError
from ftjax.models import gguf_io, kernels, loading, packaged, quantize
from ftjax.objectives import objective_for
from ftjax.state import partition

UNITS = {'GiB': 1 << 30, 'MiB': 1 << 20, 'KiB': 1 << 10}
# Per chip (one JAX device): HBM bytes, peak dense bf16 FLOP/s, HBM bytes/s (Google Cloud's published specs).
TPU_CHIPS = {
    'v4': (32 << 30, 275e12, 1228e9),
    'v5e': (16 << 30, 197e12, 819e9),
    'v5p': (95 << 30, 459e12, 2765e9),
    'v6e': (32 << 30, 918e12, 1640e9),
}


def is_tpu_topology(text):
    """'v5e:2x2' names a TPU topology; 'data=4,fsdp=2' gives fake CPU mesh sizes."""
    return bool(text) and '=' not in text and ':' in text


def tpu_devices(name):
    """The devices of the TPU topology `name` (no TPU needed: libtpu's compiler targets them)."""
    chip = name.split(':')[0].lower()
    if chip not in TPU_CHIPS:
        raise ConfigError(f"--topology={name!r}: the chip should be one of {sorted(TPU_CHIPS)}, "
                         f"e.g. --topology=v5e:2x2.")
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')  # another JAX process may hold libtpu's lockfile
    dims = [int(d) for d in name.split(':', 1)[1].split('x') if d.isdigit()]
    kwargs = {}
    if dims and math.prod(dims) < 4:  # fewer chips than one default host (2x2): a host of exactly these (v5e:1x1)
        kwargs['chips_per_host_bounds'] = tuple(dims + [1] * (3 - len(dims)))
    try:
        return list(topologies.get_topology_desc(platform='tpu', topology_name=name, **kwargs).devices)
    except Exception as e:  # no libtpu, or a name libtpu does not know
        raise EnvironmentSetupError(
            f"--topology={name!r}: libtpu could not describe this TPU topology ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); install it with `pip install -e '.[tpu]'` and use "
            f"a name like v5e:2x2 or v5p:2x2x2.") from e


def parse_topology(text):
    """'data=4,fsdp=2' -> {'data': 4, 'fsdp': 2, 'tensor': 1}."""
    sizes = dict.fromkeys(sharding.MESH_AXES, 1)
    for part in filter(None, (text or '').split(',')):
        name, _, value = part.partition('=')
        if name.strip() not in sizes or not value.strip().isdigit() or int(value) < 1:
            raise ConfigError(f"--topology: {part!r} should be AXIS=SIZE with AXIS one of {sharding.MESH_AXES} and "
                             f"SIZE a positive integer, e.g. --topology=data=4,fsdp=2,tensor=1.")
        sizes[name.strip()] = int(value)
    return sizes


def with_device_count(xla_flags, n):
    """An XLA_FLAGS string with its fake CPU device count set to `n`, every other flag kept."""
    kept = [f for f in (xla_flags or '').split() if 'xla_force_host_platform_device_count' not in f]
    return ' '.join(kept + [f'--xla_force_host_platform_device_count={n}'])


def use_fake_cpu_devices(n):
    """`n` CPU devices for this process; must run before anything initialises a JAX backend."""
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
        raise RuntimeError('compile_check: a JAX backend was initialised before the fake devices could be set up; '
                           'run it as `python -m ftjax compile_check ...` in a fresh process.')
    os.environ['XLA_FLAGS'] = with_device_count(os.environ.get('XLA_FLAGS'), n)
    jax.config.update('jax_platforms', 'cpu')
    jax.config.update('jax_num_cpu_devices', n)


def hf_config_of(path):
    """The architecture config of a HF directory, hub name or .gguf file, without reading any weights."""
    path = packaged.resolve(path)  # 'packaged:smollm2' -> the installed file
    if str(path).endswith('.gguf'):
        return gguf_io.read_gguf_config(path)
    if os.path.isdir(path):
        return loading.read_config(path)
    import huggingface_hub
    try:
        with open(huggingface_hub.hf_hub_download(path, 'config.json')) as f:
            return json.load(f)
    except Exception as e:
        raise MissingFileError(f"config.model.path={path!r}: no local directory or .gguf file, and its config.json "
                                f"could not be fetched from the hub ({type(e).__name__}: "
                                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}).") from e


def abstract_model(config, platform: str | None = None):
    """(Pretrained whose params are shape structs, trainable mask): `build.build_model_and_mask` without weights,
    for a step that runs on `platform` (this process's backend by default)."""
    m = config.model
    hf = hf_config_of(m.path)
    cfg = loading.config_from_hf(hf, m.path, num_labels=m.num_labels, pooling=m.pooling, dtype=m.dtype,
                                 param_dtype=m.param_dtype, remat=m.remat, scan_unroll=m.scan_unroll)
    model = loading.build_model(cfg)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(m.param_dtype)),
                          nn.unbox(loading.abstract_variables(model))['params'])
    if m.adapter:
        logging.warning('compile_check: model.adapter is not read; the adapter is sized from config.peft.lora.')
    pre = loading.Pretrained(model, params, None, cfg, hf, str(m.path))
    out = {}

    def prepared(params):  # the real `peft.prepare`, traced: adapters are added as shapes only
        out['pre'], out['mask'] = peft.prepare(dataclasses.replace(pre, params=params), config, jax.random.key(0),
                                                  platform)
        return out['pre'].params
    params = jax.eval_shape(prepared, params)
    if m.quantize == 'gguf':
        raise ConfigError("compile_check sizes model.quantize='int8' or 'nf4' bases from shapes alone; 'gguf' keeps "
                          "a file's own blocks, which it does not read: pass --config.model.quantize=nf4 (4.5 bits "
                          "per weight, Q4_1 is 5) or int8.")
    pre = build.quantize_frozen(dataclasses.replace(out['pre'], params=params), out['mask'], config)  # shapes only
    return pre, out['mask']


def abstract_batch(config, model, batch_sh):
    """Shape structs of one global batch of `config`'s objective, as `ftjax.data` lays it out (`data.layout`)."""
    objective = objective_for(config, model)
    return layout.abstract_batch(objective.name, config.train.batch_size, config.data.max_length, batch_sh,
                                 reference=objective.reference == 'precomputed')


def _device_bytes(abstract, shardings, memory_kind='device'):
    """Bytes one device holds of a tree in `memory_kind` ('device', or 'pinned_host': what optim.offload_state /
    model.offload_frozen keep in host memory), the largest shard of each leaf."""
    return sum(math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
               for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings))
               if (s.memory_kind or 'device') == memory_kind)


def check(config, topology, devices=None, topology_name=None, keep_compiled=False):
    """Compiles the train step of `config` for the mesh `topology` ({'data': 4, 'fsdp': 2, 'tensor': 1}) over
    `devices` (this process's by default; a TPU topology's from `tpu_devices`); returns the numbers the
    command prints (bytes per device), and the compiled step as 'compiled' when `keep_compiled`."""
    n = math.prod(topology.values())
    devices = jax.devices()[:n] if devices is None else devices
    if len(devices) < n:
        raise ConfigError(f"--topology needs {n} devices, this process has {len(devices)}.")
    config = config.copy_and_resolve_references()  # the caller's config stays as it was
    for axis, size in topology.items():
        config.mesh[axis] = size
    platform = devices[0].platform
    config.model.kernels = kernels.resolve(config.model.kernels, platform)  # for the target
    validate(config)
    batch_ways = topology['data'] * topology['fsdp']
    if config.train.batch_size % batch_ways:
        raise ConfigError(f"config.train.batch_size={config.train.batch_size} is not divisible by data*fsdp="
                         f"{batch_ways}; pass --config.train.batch_size=<a multiple of {batch_ways}>.")
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.rules_from_config(config.mesh.rules)
    pre, mask = abstract_model(config, platform)
    trainable, frozen = partition(pre.params, mask)
    tx, schedule = optim.make_optimizer(config, trainable, config.train.steps)
    abstract_state, state_sh, _ = build.state_shardings(pre.model, pre.params, mask, tx, config, mesh, rules)
    state_in = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_sh)
    batch_sh = sharding.batch_sharding(mesh)
    batch_in = abstract_batch(config, pre.model, batch_sh)
    p_step = build.jit_train_step(pre.model, config, tx, schedule, state_sh, batch_sh)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        lowered = p_step.lower(state_in, batch_in, jax.eval_shape(lambda: jax.random.key(0)))
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses a step that cannot fit its HBM
            if 'RESOURCE_EXHAUSTED' not in str(e):
                raise
            raise ConfigError(f"the train step does not fit {topology_name or platform} ({str(e).splitlines()[0]}); "
                              f"lower config.train.batch_size or data.max_length, quantize the frozen base "
                              f"(--config.model.quantize=nf4) or use more devices.") from e
    mem = compiled.memory_analysis()
    out = {
        'mesh': dict(mesh.shape), 'model': str(config.model.path), 'method': config.peft.method,
        'batch': (config.train.batch_size, config.data.max_length), 'compile_s': time.perf_counter() - t0,
        'platform': platform, 'topology': topology_name, 'devices': n, 'kernels': config.model.kernels,
        'dtype': str(config.model.dtype), 'frozen_dtype': str(config.model.frozen_dtype),
        'params': quantize.num_weights(pre.params), 'quantize': quantize.describe(config.model),
        'trainable_params': sum(math.prod(x.shape) for x in jax.tree.leaves(trainable)),
        'trainable_bytes': _device_bytes(abstract_state.trainable, state_sh.trainable),
        'frozen_bytes': _device_bytes(abstract_state.frozen, state_sh.frozen),
        'optimizer_bytes': _device_bytes(abstract_state.opt_state, state_sh.opt_state),
        'offloaded_state_bytes': _device_bytes(abstract_state, state_sh, 'pinned_host'),
    }
    for key in ('argument', 'output', 'alias', 'temp', 'generated_code', 'host_temp', 'host_argument', 'host_output',
                'host_alias'):
        out[f'{key}_bytes'] = getattr(mem, f'{key}_size_in_bytes', None) if mem is not None else None
    hlo = compiled.as_text()
    out['collectives'] = collective_bytes(hlo)
    found = kernels.kernel_names_in(hlo)
    out['attention'] = found[0] if found else ('cpu custom VJP' if config.model.kernels == 'cpu' else 'xla')
    out.update(_estimates(out, compiled.cost_analysis(), pre.config, topology_name))
    if keep_compiled:
        out['compiled'] = compiled
    return out


COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-to-all', 'ragged-all-to-all', 'all-reduce', 'collective-permute')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%([\w.-]+) = (\([^=]*?\)|[a-z]\w*\[[\d,]*\]\S*) ([a-z-]+)\(([^)]*)\)')
_SHAPE = re.compile(r'\b(pred|[a-z]+\d+(?:e\d+m\d+\w*)?)\[([\d,]*)\]')


def _shape_bytes(text, last=False):
    """Bytes of an HLO result type ('bf16[4,8,128]{...}' or a tuple of them; `last`: the tuple's last one)."""
    shapes = _SHAPE.findall(text)
    shapes = shapes[-1:] if last else shapes
    bits = {'pred': 8}
    total = 0
    for dtype, dims in shapes:
        width = bits.get(dtype) or int(re.sub(r'\D.*', '', dtype.lstrip('abcdefghijklmnopqrstuvwxyz')) or 32)
        total += math.prod(int(d) for d in dims.split(',') if d) * width // 8
    return total


def collective_bytes(hlo_text):
    """{kind: {'count', 'bytes'}} of the collectives in a compiled module's HLO text, per device: each op's
    larger side (operand or result: what an all-gather receives, what a reduce-scatter sends), an async
    `-start` counted once. A loop body (the scanned layers) is counted once, as XLA's cost analysis does."""
    shapes, out = {}, {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, result, op, args = m.groups()
        start = op.endswith('-start')
        shapes[name] = _shape_bytes(result, last=start)
        kind = op[:-len('-start')] if start else op
        if kind not in COLLECTIVES:
            continue
        operands = sum(shapes.get(a.strip().lstrip('%'), 0) for a in args.split(',') if a.strip().startswith('%'))
        entry = out.setdefault(kind, {'count': 0, 'bytes': 0})
        entry['count'] += 1
        entry['bytes'] += max(shapes[name], operands)
    return out


def _estimates(r, cost, cfg, topology_name):
    """Per-device bytes and fit, compiled FLOPs, and (TPU) a roofline estimate of step time and MFU."""
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    a, o, al, t = (r[f'{k}_bytes'] for k in ('argument', 'output', 'alias', 'temp'))
    total = None if None in (a, o, al, t) else a + o - al + t
    flops_dev, bytes_dev = cost.get('flops'), cost.get('bytes accessed')
    out = {'per_device_bytes': {'arguments': a, 'output': o, 'temp': t, 'total': total},
           'flops_per_step': None if flops_dev is None else flops_dev * r['devices'],
           'bytes_accessed_per_device': bytes_dev}
    chip = chip_of(topology_name)
    if chip is None:
        return out
    hbm, peak, bandwidth = chip
    tokens, seq = r['batch'][0] * r['batch'][1], r['batch'][1]
    # Model FLOPs (PaLM's convention) per token: 2N forward + 2N activation gradients + 2N_trainable weight
    # gradients, plus 12 * layers * heads * head_dim * seq for attention (forward and backward). Remat
    # recomputes the forward once more. XLA's cost analysis counts each loop body (the layer scan, the loss
    # chunks) once, so the compiled FLOPs are a lower bound and the estimate takes the larger of the two.
    # A MoE token meets k of the E experts: N counts the active parameters (the trainable ones in proportion).
    attn = 12 * getattr(cfg, 'num_layers', 0) * getattr(cfg, 'num_heads', 0) * getattr(cfg, 'head_dim', 0) * seq
    e, k = getattr(cfg, 'num_experts', 0), getattr(cfg, 'experts_per_token', 0)
    idle = cfg.num_layers * (e - k) * 3 * cfg.hidden_size * cfg.moe_intermediate_size if e else 0
    active = r['params'] - idle
    active_trainable = r['trainable_params'] * active / max(r['params'], 1)
    model_flops = tokens * (4 * active + 2 * active_trainable + attn)
    recompute = tokens * (2 * active + attn / 3) if getattr(cfg, 'remat', 'none') != 'none' else 0
    flops_dev = max(flops_dev or 0, (model_flops + recompute) / r['devices'])
    bytes_dev = max(bytes_dev or 0, a or 0)  # at least the state is read once
    step_s = max(flops_dev / peak, bytes_dev / bandwidth)
    out.update({'hbm_bytes': hbm, 'fits': total is not None and total <= hbm,
                'estimate': {'step_s': step_s, 'tokens_per_s': tokens / step_s,
                             'mfu': model_flops / (r['devices'] * peak * step_s),
                             'model_flops_per_step': model_flops,
                             'basis': 'roofline: max(FLOPs / peak bf16 FLOP/s, bytes / HBM bandwidth) per device, '
                                      'FLOPs = the larger of the compiled count (loop bodies counted once) and '
                                      'model FLOPs + remat recompute; an estimate, not a measurement'}})
    return out


def _size(v):
    if v is None:
        return 'n/a'
    unit = next((u for u in ('GiB', 'MiB', 'KiB') if v >= UNITS[u]), 'B')
    return f'{v / UNITS.get(unit, 1):,.2f} {unit}' if unit != 'B' else f'{v} B'


def format_report(r):
    mesh = ', '.join(f'{k}={v}' for k, v in r['mesh'].items())
    target = f"TPU {r['topology']}, " if r.get('topology') else ''
    compiler = 'TPU compiler' if r['platform'] == 'tpu' else f"{r['platform'].upper()} compiler"
    lines = [f"compile check: {r['model']} ({r['method']}), {target}mesh {mesh} = {math.prod(r['mesh'].values())} "
             f"devices, global batch {r['batch'][0]} x {r['batch'][1]} tokens; compiled in {r['compile_s']:.1f}s",
             f"  params: {r['params']:,} ({r['trainable_params']:,} trainable); compute {r['dtype']}, frozen "
             f"{r['frozen_dtype'] if r.get('quantize', 'none') == 'none' else 'quantized ' + r['quantize']}; "
             f"kernels {r['kernels']}, attention: {r['attention']}",
             'per device:',
             f"  trainable params      {_size(r['trainable_bytes'])}",
             f"  frozen params         {_size(r['frozen_bytes'])}",
             f"  optimizer state       {_size(r['optimizer_bytes'])}"
             + (f"  (+ {_size(r['offloaded_state_bytes'])} of the state in host memory)"
                if r.get('offloaded_state_bytes') else ''),
             f'compiled train step, per device (XLA memory analysis, {compiler}):',
             f"  arguments             {_size(r['argument_bytes'])}",
             f"  outputs               {_size(r['output_bytes'])}  ({_size(r['alias_bytes'])} aliased to donated "
             f"arguments)",
             f"  temporaries           {_size(r['temp_bytes'])}",
             f"  generated code        {_size(r['generated_code_bytes'])}"]
    total = r['per_device_bytes']['total']
    if total is not None:
        lines.append(f"  total (args + outputs - aliased + temporaries)  {_size(total)}")
    if r.get('collectives'):
        lines.append('collectives per device (compiled HLO, the larger of operand and result; a loop body once): ' +
                     ', '.join(f"{k} {v['count']} x {_size(v['bytes'])}" for k, v in sorted(r['collectives'].items())))
    if r.get('host_temp_bytes'):
        lines.append(f"  host memory (offloaded activations)  {_size(r['host_temp_bytes'])}")
    if r.get('host_argument_bytes'):
        lines.append(f"  host memory (arguments kept there: optim.offload_state, model.offload_frozen)  "
                     f"{_size(r['host_argument_bytes'])} ({_size(r.get('host_alias_bytes') or 0)} aliased to donated "
                     f"arguments)")
    if 'hbm_bytes' in r:
        e = r['estimate']
        lines.append(f"  HBM per chip          {_size(r['hbm_bytes'])}: fits: {str(r['fits']).lower()}")
        lines.append(f"FLOPs per step: compiled {r['flops_per_step'] or 0:.3e} (XLA counts loop bodies once), "
                     f"model {e['model_flops_per_step']:.3e}")
        lines.append(f"estimated (roofline, not measured): step {e['step_s']:.3f} s, {e['tokens_per_s']:,.0f} "
                     f"tokens/s, MFU {e['mfu']:.0%}")
    return '\n'.join(lines)


def summary_json(r):
    """The last line the command prints: the report's headline numbers as one JSON object."""
    keys = ('platform', 'topology', 'devices', 'mesh', 'model', 'method', 'batch', 'kernels', 'attention',
            'quantize', 'frozen_bytes', 'per_device_bytes', 'hbm_bytes', 'fits', 'flops_per_step', 'estimate',
            'collectives', 'host_argument_bytes', 'compile_s')
    return json.dumps({k: r[k] for k in keys if k in r})


def chip_of(topology_name):
    """(HBM bytes, peak FLOP/s, HBM bytes/s) of a TPU topology's chip ('v5e:2x2' -> v5e), None for no topology."""
    return TPU_CHIPS.get(str(topology_name).split(':')[0].lower()) if topology_name else None


def memory_budget(topology_name, budget_bytes=None):
    """Bytes a device may hold: the chip's HBM for a TPU topology, else `budget_bytes` (--hbm_gib)."""
    chip = chip_of(topology_name)
    if chip is None and budget_bytes is None:
        raise ConfigError('compile_check --estimate on fake CPU devices needs a memory budget per device: pass '
                          '--hbm_gib=16 (or a TPU topology, whose HBM is known).')
    return chip[0] if chip else budget_bytes


ESTIMATE_POLICIES = ('full', 'save_qkv', 'offload_layer_inputs', 'offload_layer_inputs_and_projections')


def estimate(config, topology, devices=None, topology_name=None, policies=ESTIMATE_POLICIES, budget_bytes=None,
             max_rows=64, log=functools.partial(print, flush=True), contexts=None):
    """For each remat policy (and each context size in `contexts`, where given), the largest per-device batch
    (rows of data.max_length tokens per data x fsdp shard) whose train step compiles and fits: the chip's HBM
    for a TPU topology, else `budget_bytes`. Doubles the rows from 1 until a step does not fit (or past
    `max_rows`), then bisects; returns [{'context', 'policy', 'rows', 'report' (the largest fitting step's
    `check`), 'compiles', 'capped' (rows == max_rows: more may fit)}] (rows 0: not even one row fits). A
    context size takes its devices from the fsdp axis (`context_mesh`)."""
    budget = memory_budget(topology_name, budget_bytes)
    rows_out = []
    for context in contexts or [topology.get('context', 1)]:
        topo = context_mesh(topology, context)
        ways = topo['data'] * topo['fsdp']
        for policy in policies:
            tried = {}

            def fits(rows):
                c = config.copy_and_resolve_references()
                c.model.remat, c.train.batch_size = policy, rows * ways
                try:
                    r = check(c, topo, devices, topology_name)
                except ConfigError as e:
                    if 'does not fit' not in str(e):
                        raise
                    r = None
                total = None if r is None else r['per_device_bytes']['total']
                tried[rows] = r if total is not None and total <= budget else None
                log(f"  context {context}, {policy}: {rows} rows/device -> " + (
                    'refused by the compiler' if r is None else
                    f"{_size(total)}{' (fits)' if tried[rows] else ' (over)'}"))
                return tried[rows] is not None
            lo, rows = 0, 1  # lo: the largest that fits so far
            while rows <= max_rows and fits(rows):
                lo, rows = rows, rows * 2
            hi = min(rows, max_rows + 1)  # the smallest that does not fit (or one past the cap)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if fits(mid) else (lo, mid)
            rows_out.append({'context': context, 'policy': policy, 'rows': lo, 'report': tried.get(lo),
                             'compiles': len(tried), 'capped': lo == max_rows})
    return rows_out


def context_mesh(topology, context):
    """`topology` ({axis: size}) with `context` devices per row along 'context', taken from (or given back to)
    the fsdp axis, the device count unchanged."""
    topo = {a: topology.get(a, 1) for a in sharding.MESH_AXES}
    pool = topo['fsdp'] * topo['context']
    if context < 1 or pool % context:
        raise ConfigError(f"--contexts: {context} does not divide the fsdp x context devices of the mesh ({pool}: "
                          f"fsdp={topo['fsdp']}, context={topo['context']}); give divisors of {pool}.")
    return dict(topo, fsdp=pool // context, context=context)


def format_estimate(results, budget_bytes):
    contexts = len({e.get('context', 1) for e in results}) > 1  # a column only when the search varied it
    lines = [f"|{' context (fsdp) |' if contexts else ''} remat policy | largest rows per device | per device "
             f"(HBM {_size(budget_bytes)}) | host memory | compiles |", '|---' * (6 if contexts else 5) + '|']
    for e in results:
        r = e['report'] or {}
        total = (r.get('per_device_bytes') or {}).get('total')
        rows = f"{e['rows']}{'+' if e['capped'] else ''}"
        mesh = r.get('mesh') or {}
        where = f" {e.get('context', 1)} ({mesh.get('fsdp', '-')}) |" if contexts else ''
        lines.append(f"|{where} {e['policy']} | {rows} | {_size(total)} | {_size(r.get('host_temp_bytes') or 0)} | "
                     f"{e['compiles']} |")
    return '\n'.join(lines)
