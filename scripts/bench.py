r"""Training-step benchmark: ftjax (and optionally transformers + PEFT) on the same model, batch and machine.

  python scripts/bench.py [--config=experiments/quickstart.py] [--config.KEY=VALUE ...] \
      [--mode=lora] [--batch=8] [--seq=256] [--steps=4] [--compare=torch] [--model=PATH | --random_init=NAME] \
      [--rank=8] [--remat=full] [--dtype=float32] [--frozen_dtype=...] [--quantize=none|int8|nf4|gguf] \
      [--out=FILE] [--profile=DIR]

The run is described by an experiment config, exactly as for `python -m ftjax train` (ftjax/cli/config_flag.py):
--config (default experiments/quickstart.py: SmolLM2-135M, LoRA r=8 alpha=16 on all seven projections,
batch 8 x 256) with --config.KEY=VALUE overrides, list keys included
(--config.peft.lora.targets=q_proj$ --config.peft.lora.targets=v_proj$). The short flags are shortcuts
applied on top: --model (model.path), --mode (peft.method; partial trains the last 2 blocks unless the
config chose what trains), --batch / --batch_size (train.batch_size), --seq / --seq_len
(data.max_length), --rank (peft.lora.rank, alpha = 2 x rank as in the torch run), --remat (model.remat),
--dtype (model.dtype, and model.frozen_dtype unless --frozen_dtype), --quantize (model.quantize: the frozen
base stored int8 / nf4 / as the GGUF file's blocks; --quantize_double), --scan_unroll, --loss_chunk.

The step is the trainer's own (ftjax/loop.py): `build.build_model_and_mask`, the Optax chain of
`optim.make_optimizer`, `build.sharded_state` and `build.jit_train_step` on a 1-device mesh, fed random
token batches placed like the trainer's (`data.to_global`). Compilation is excluded; --steps steps are
timed after --warmup untimed steps (default 1). Printed: the CPU model and a matmul peak measured in the same
run (one 2048^3 matmul in the compute dtype on the same device, the MFU denominator), a table (step time median /
min / max, tokens/s, achieved TFLOP/s, MFU, peak memory, compile time) and, last, one JSON line with every
figure. --compare=torch runs scripts/bench_torch.py (transformers + PEFT, same weights, batch, AdamW and
LoRA modules; nothing of jax loaded) as a subprocess after the ftjax run, for its own peak RSS.

FLOPs convention: a weight that trains costs 6 FLOPs per parameter per token (forward 2, backward 4),
a frozen weight 4 (forward 2, gradient w.r.t. activations 2), attention scores and values
12 * layers * seq * heads * head_dim per token (PaLM's count, causal mask not discounted); the
embedding lookup is free. Peak memory on CPU is the peak RSS from the first training step on.
`frozen_param_bytes` in the JSON line: the bytes the frozen parameters occupy in the train state (quantized or
not), `trainable_param_bytes` those of the trainable ones.
"""
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, 'scripts')
sys.path[:0] = [REPO, SCRIPTS]

import flax.linen as nn  # noqa: E402  (after the path set-up: the script runs from a checkout)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import bench_torch  # noqa: E402  (scripts/bench_torch.py: torch side, peak-RSS helpers)
import cpu_probe  # noqa: E402  (scripts/cpu_probe.py: the CPU's model, family and vector ISA)
from ftjax import build, data as data_lib, optim, sharding  # noqa: E402
from ftjax import config as config_lib  # noqa: E402
from ftjax.data import layout  # noqa: E402
from ftjax import state as state_lib  # noqa: E402
from ftjax.cli import config_flag, console  # noqa: E402
from ftjax.errors import ConfigError, EnvironmentSetupError  # noqa: E402
from ftjax.models import LlamaConfig, abstract_variables, build_model, convert, packaged, quantize  # noqa: E402
from ftjax.models.heads import task_of  # noqa: E402
from ftjax.peft import LastLayers  # noqa: E402

DEFAULT_EXPERIMENT = os.path.join(REPO, 'experiments', 'quickstart.py')
RANDOM_SHAPES = {  # Llama-shaped models with random weights (no download)
    'smollm2': dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    'llama1b': dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    'tiny': dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}

FLAGS = flags.FLAGS
config_flag.define_config_flag()
flags.DEFINE_string('model', None, 'Shortcut for --config.model.path: HF directory, .gguf file, packaged:NAME.')
flags.DEFINE_enum('random_init', None, sorted(RANDOM_SHAPES), 'A Llama-shaped model with random weights '
                  '(written once under /tmp) instead of the config\'s model.')
flags.DEFINE_enum('mode', None, ['full', 'partial', 'lora', 'dora'], 'Shortcut for --config.peft.method.')
flags.DEFINE_integer('batch', None, 'Shortcut for --config.train.batch_size.')
flags.DEFINE_alias('batch_size', 'batch')
flags.DEFINE_integer('seq', None, 'Shortcut for --config.data.max_length (tokens per row).')
flags.DEFINE_alias('seq_len', 'seq')
flags.DEFINE_integer('steps', 4, 'Timed steps, after --warmup steps (the schedule still spans train.steps).')
flags.DEFINE_integer('warmup', 1, 'Untimed steps before the timed ones (0: time the first step after the '
                     'ahead-of-time compile, for steps too long to run twice, e.g. 16k-token rows on a CPU).')
flags.DEFINE_integer('rank', None, 'Shortcut: --config.peft.lora.rank=R and --config.peft.lora.alpha=2R.')
flags.DEFINE_string('remat', None, 'Shortcut for --config.model.remat.')
flags.DEFINE_string('dtype', None, 'Shortcut for --config.model.dtype (compute; bfloat16 on GPU/TPU), also the '
                    'frozen weights\' storage unless --frozen_dtype.')
flags.DEFINE_string('frozen_dtype', None, 'Shortcut for --config.model.frozen_dtype.')
flags.DEFINE_enum('quantize', None, list(quantize.KINDS), 'Shortcut for --config.model.quantize (the frozen base: '
                  'int8, nf4, or the GGUF file\'s own blocks).')
flags.DEFINE_bool('quantize_double', None, 'Shortcut for --config.model.quantize_double (nf4).')
flags.DEFINE_integer('scan_unroll', None, 'Shortcut for --config.model.scan_unroll.')
flags.DEFINE_integer('loss_chunk', None, 'Shortcut for --config.train.loss_chunk.')
flags.DEFINE_enum('compare', None, ['torch'], 'Also time transformers + PEFT (scripts/bench_torch.py).')
flags.DEFINE_bool('torch_remat', False, 'Gradient checkpointing for the torch run too (default off: torch at '
                  'its fastest).')
flags.DEFINE_string('out', None, 'Also append the JSON line to this file.')
flags.DEFINE_string('profile', None, 'Write a profiler trace of one extra step (and the compiled HLO) to this '
                    'directory (TensorBoard / Perfetto).')


# --- the config ---------------------------------------------------------------------------------------

def bench_config(config, model=None, mode=None, batch=None, seq=None, rank=None, remat=None, dtype=None,
                 frozen_dtype=None, scan_unroll=None, loss_chunk=None, quantize=None, quantize_double=None):
    """The experiment config with the short flags applied (None: keep the config's value), on one device;
    validated. The caller's config is not changed."""
    c = config.copy_and_resolve_references()
    shortcuts = {'model.path': model, 'peft.method': mode, 'train.batch_size': batch, 'data.max_length': seq,
                 'peft.lora.rank': rank, 'peft.lora.alpha': None if rank is None else 2.0 * rank,
                 'model.remat': remat, 'model.dtype': dtype, 'model.frozen_dtype': frozen_dtype or dtype,
                 'model.scan_unroll': scan_unroll, 'train.loss_chunk': loss_chunk, 'model.quantize': quantize,
                 'model.quantize_double': quantize_double}
    for name, value in shortcuts.items():
        if value is not None:
            *groups, leaf = name.split('.')
            node = c
            for group in groups:
                node = node[group]
            node[leaf] = value
    if mode == 'partial' and not c.peft.last_n_blocks and not c.peft.trainable:
        c.peft.last_n_blocks = 2  # the last two blocks train whole, the rest is frozen
    for axis in config_lib.MESH_AXES:
        c.mesh[axis] = 1
    return config_lib.validate(c)


def with_default_experiment(argv):
    """argv with --config=experiments/quickstart.py added when it names no experiment."""
    if any(re.match(r'^--?config(=|$)', a) for a in argv[1:]):
        return list(argv)
    return [argv[0], f'--config={DEFAULT_EXPERIMENT}', *argv[1:]]


def experiment_of(argv):
    specs = [a.split('=', 1)[1] for a in argv if re.match(r'^--?config=', a)]
    return os.path.relpath(specs[-1], REPO) if specs and specs[-1].startswith(REPO) else (specs or [None])[-1]


# --- the model -------------------------------------------------------------------------------------------

def random_checkpoint(name):
    """A Llama of shape RANDOM_SHAPES[name] with random weights, as a HF directory under /tmp (numpy only)."""
    path = os.path.join('/tmp', f'ftjax_bench_{name}')
    if os.path.exists(os.path.join(path, 'config.json')):
        return path
    from safetensors.numpy import save_file
    os.makedirs(path, exist_ok=True)
    hf = dict(RANDOM_SHAPES[name], model_type='llama', architectures=['LlamaForCausalLM'], rms_norm_eps=1e-5,
              rope_theta=10000.0, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
    cfg = LlamaConfig.from_hf(hf)
    shapes = nn.unbox(abstract_variables(build_model(cfg)))['params']
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32) * 0.02, shapes)
    save_file(convert.params_to_hf(params, convert.llama_table(cfg), cfg.num_layers),
              os.path.join(path, 'model.safetensors'), metadata={'format': 'pt'})
    with open(os.path.join(path, 'config.json'), 'w') as f:
        json.dump(hf, f)
    return path


def matmul_params(params, mask, tied):
    """(trainable, frozen) parameter counts of matrix weights, as used per token.

    The embedding table counts only when it is also the LM head (`tied`); a `LastLayers(n)` mask
    leaf counts n of its L stacked layers as trainable and the rest as frozen; vectors (norms,
    biases, DoRA magnitudes, also when stacked per layer) are not matmuls and do not count.
    """
    t = f = 0
    flat_p = jax.tree_util.tree_flatten_with_path(params, is_leaf=quantize.is_quantized)[0]  # a QArray: one leaf
    flat_m = jax.tree.leaves(mask, is_leaf=lambda m: isinstance(m, LastLayers))
    assert len(flat_p) == len(flat_m), 'mask and params differ in structure'
    for (path, x), m in zip(flat_p, flat_m):
        name = str(getattr(path[-1], 'key', path[-1]))
        if not (name in ('kernel', 'lora_a', 'lora_b') or (name == 'embedding' and tied)):
            continue
        n = int(np.prod(x.shape))
        if isinstance(m, LastLayers):
            part = n * m.n // x.shape[0]
            t, f = t + part, f + n - part
        elif m:
            t += n
        else:
            f += n
    return t, f


def adapter_modules(params, cfg):
    """The transformers module names (q_proj, ...) of the Dense layers that carry ftjax's LoRA adapters:
    PEFT's target_modules for the same adapters."""
    hf_names = convert.linear_modules(convert.hf_rows(cfg)[0])  # {('layers', 'q_proj'): 'model.layers.{i}...'}
    paths = {tuple(str(getattr(k, 'key', k)) for k in p[:-1])
             for p, _ in jax.tree_util.tree_flatten_with_path(params)[0] if getattr(p[-1], 'key', '') == 'lora_a'}
    return sorted({hf_names[p].rsplit('.', 1)[-1] for p in paths if p in hf_names})


def flops_per_token(cfg, n_trainable_mm, n_frozen_mm, seq):
    attn = 12 * cfg.num_layers * seq * cfg.num_heads * cfg.head_dim
    return 6 * n_trainable_mm + 4 * n_frozen_mm + attn


def matmul_peak(dtype, n=2048, reps=5):
    """FLOP/s of one large matmul in `dtype` on the default device (the MFU denominator)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / min(times)


def cpu_model():
    """The CPU as `lscpu` names it, with family/model number and vector ISA (they set the speed ratios), and
    the cores this process may use: e.g. 'AMD EPYC (family 25 model 1, avx2 fma; 2 cores)'."""
    info = cpu_probe.cpu_info()
    isa = ' '.join(f for f in info['isa'] if f in ('avx2', 'fma', 'avx512f', 'amx_tile')) or 'no avx2'
    return f"{info['model']} (family {info['family']} model {info['model_number']}, {isa}; {info['cores']} cores)"


def random_batch(batch, seq, vocab_size):
    """Random tokens as the trainer's LM batches (`ftjax.data.layout`): {name: np.ndarray [batch, seq]}."""
    ids = np.random.default_rng(0).integers(0, vocab_size, (batch, seq + 1)).astype(np.int32)
    out = layout.empty('lm', batch, seq, pad_id=0)
    out['input_ids'][:], out['target_ids'][:] = ids[:, :-1], ids[:, 1:]
    out['loss_mask'][:], out['segment_ids'][:], out['positions'][:] = 1, 1, np.arange(seq)  # one example a row
    return out


# --- the two runs ----------------------------------------------------------------------------------------

def bench_ftjax(config, steps, profile=None, warmup=1):
    """The trainer's state and compiled step (ftjax/loop.py) on a 1-device mesh, timed on random batches."""
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    rules = sharding.rules_from_config(config.mesh.rules)
    pre, mask = build.build_model_and_mask(config)
    model, model_cfg = pre.model, pre.config
    if task_of(model_cfg) != 'lm':
        raise ConfigError(f'config.model.path={config.model.path!r} is an encoder; scripts/bench.py times decoder '
                          f'LMs (use a Llama-family model).')
    n_tr, n_fr = matmul_params(pre.params, mask, getattr(model_cfg, 'tie_embeddings', False))
    lora_modules = adapter_modules(pre.params, model_cfg)
    trainable, _ = state_lib.partition(pre.params, mask)
    tx, schedule = optim.make_optimizer(config, trainable, config.train.steps)
    state, state_sh = build.sharded_state(pre, mask, tx, config, mesh, rules)
    del pre, trainable  # host copies of the weights: only the device state stays
    param_bytes = {'frozen_param_bytes': quantize.nbytes(state.frozen),
                   'trainable_param_bytes': quantize.nbytes(state.trainable)}
    batch_sh = sharding.batch_sharding(mesh)
    p_step = build.jit_train_step(model, config, tx, schedule, state_sh, batch_sh)
    b, t = config.train.batch_size, config.data.max_length
    batch = data_lib.to_global(random_batch(b, t, model_cfg.vocab_size), batch_sh)
    key = jax.random.key(config.train.seed)
    keys = [jax.random.fold_in(key, i) for i in range(steps + warmup)]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        t0 = time.perf_counter()
        compiled = p_step.lower(state, batch, key).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        bench_torch.reset_peak_rss()
        times = []
        for i in range(steps + warmup):  # the first `warmup` steps are not timed
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch, keys[i])
            jax.block_until_ready((state, metrics))
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        if profile:
            with jax.profiler.trace(profile, create_perfetto_trace=True):
                state, metrics = compiled(state, batch, key)
                jax.block_until_ready(metrics)
            with open(os.path.join(profile, 'train_step.hlo.txt'), 'w') as f:
                f.write(compiled.as_text())
    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != 'cpu' else None
    peak_mb = (stats['peak_bytes_in_use'] / 2 ** 20 if stats and 'peak_bytes_in_use' in stats
               else bench_torch.peak_rss_mb())
    return dict(times=times, compile_s=compile_s, peak_mb=peak_mb, peak_kind='device' if stats else 'rss',
                flops_per_token=flops_per_token(model_cfg, n_tr, n_fr, t), trainable_params=n_tr,
                compiled_temp_mb=getattr(mem, 'temp_size_in_bytes', 0) / 2 ** 20 if mem else None,
                loss=float(metrics['loss']), device=f'{dev.platform}:{dev.device_kind}', lora_modules=lora_modules,
                **param_bytes)


def check_torch_comparable(config):
    """--compare=torch: the method must exist in PEFT, and torch + transformers (+ peft) must be installed."""
    method = config.peft.method
    if method == 'partial':
        raise ConfigError('--compare=torch: config.peft.method=partial has no transformers + PEFT counterpart '
                          'here; compare --mode=full, lora or dora.')
    missing = [m for m in ('torch', 'transformers', 'peft') if importlib.util.find_spec(m) is None]
    if missing:
        raise EnvironmentSetupError(f"--compare=torch needs {', '.join(missing)}: pip install {' '.join(missing)}.")


def run_torch(config, path, lora_modules, steps, torch_remat):
    """scripts/bench_torch.py in its own process on the same model, batch, optimizer and adapters."""
    lora, optim_cfg = config.peft.lora, config.optim
    cmd = [sys.executable, os.path.join(SCRIPTS, 'bench_torch.py'), f'--model={path}',
           f'--mode={config.peft.method}', f'--rank={lora.rank}', f'--alpha={lora.alpha}',
           f'--dropout={lora.dropout}', f'--{"" if lora.rslora else "no"}rslora',
           f"--targets={','.join(lora_modules)}", f'--dtype={config.model.dtype}',
           f'--batch={config.train.batch_size}', f'--seq={config.data.max_length}', f'--steps={steps}',
           f'--learning_rate={optim_cfg.learning_rate}', f'--weight_decay={optim_cfg.weight_decay}',
           f'--clip_norm={optim_cfg.clip_norm}', f'--{"" if torch_remat else "no"}torch_remat']
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f'the torch run failed (exit {out.returncode}): {" ".join(cmd)}\n{out.stderr[-3000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- the report --------------------------------------------------------------------------------------

def summarize(name, r, tokens, peak_flops):
    med = statistics.median(r['times'])
    out = {'name': name, 'step_s_median': med, 'step_s_min': min(r['times']), 'step_s_max': max(r['times']),
           'tokens_per_s': tokens / med, 'peak_mem_mb': r['peak_mb'], 'peak_kind': r['peak_kind']}
    if 'flops_per_token' in r:
        achieved = r['flops_per_token'] * tokens / med
        out.update(flops_per_token=r['flops_per_token'], achieved_tflops=achieved / 1e12,
                   mfu=achieved / peak_flops, compile_s=r['compile_s'], compiled_temp_mb=r['compiled_temp_mb'],
                   trainable_params=r['trainable_params'], device=r['device'],
                   frozen_param_bytes=r['frozen_param_bytes'], trainable_param_bytes=r['trainable_param_bytes'])
    return out


def report(config, path, experiment, rows, peak, cpu):
    """Prints the header, the ratio (beside the CPU model and the matmul peak), the table; returns the JSON."""
    c = config
    method = c.peft.method
    if method in ('lora', 'dora'):
        method += f' (r={c.peft.lora.rank}, alpha={c.peft.lora.alpha:g})'
    machine = f'cpu {cpu} | matmul peak {peak / 1e9:.1f} GFLOP/s ({c.model.dtype}, measured in this run)'
    quantized = quantize.describe(c.model)
    print(f'\nmodel {path} | experiment {experiment} | {method} | batch {c.train.batch_size} x seq '
          f'{c.data.max_length} | dtype {c.model.dtype} | remat {c.model.remat} | base '
          f"{'quantized ' + quantized if quantized != 'none' else 'frozen ' + c.model.frozen_dtype} "
          f"({rows[0]['frozen_param_bytes'] / 2**20:,.1f} MiB) | mesh 1 device {rows[0]['device']}\n{machine}")
    if len(rows) > 1:
        speedup = rows[0]['tokens_per_s'] / rows[1]['tokens_per_s']
        memory = rows[0]['peak_mem_mb'] / rows[1]['peak_mem_mb']
        print(f'ftjax vs torch+peft: {speedup:.2f}x tokens/s, {memory:.2f}x peak memory, one after the other on '
              f'{machine}')
    print('| impl | step s (median / min / max) | tokens/s | TFLOP/s | MFU | peak MB | compile s |')
    print('|---|---|---|---|---|---|---|')
    for r in rows:
        print(f"| {r['name']} | {r['step_s_median']:.3f} / {r['step_s_min']:.3f} / {r['step_s_max']:.3f} | "
              f"{r['tokens_per_s']:,.0f} | {r.get('achieved_tflops', float('nan')):.3f} | "
              f"{r.get('mfu', float('nan')):.1%} | {r['peak_mem_mb']:,.0f} | {r.get('compile_s', float('nan')):.1f} |")
    result = dict(rows[0], mode=c.peft.method, batch=c.train.batch_size, seq=c.data.max_length, dtype=c.model.dtype,
                  remat=c.model.remat, quantize=quantized, matmul_peak_tflops=peak / 1e12, cpu_model=cpu, model=path,
                  experiment=experiment)
    if len(rows) > 1:
        result.update(torch_tokens_per_s=rows[1]['tokens_per_s'], torch_peak_mem_mb=rows[1]['peak_mem_mb'],
                      torch_step_s_median=rows[1]['step_s_median'],
                      speedup_vs_torch=rows[0]['tokens_per_s'] / rows[1]['tokens_per_s'],
                      memory_ratio_vs_torch=rows[0]['peak_mem_mb'] / rows[1]['peak_mem_mb'])
    return json.dumps(result)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments {argv[1:]}; flags are written --name=value.')
    if FLAGS.model and FLAGS.random_init:
        raise app.UsageError('--model and --random_init both given; pass one.')
    model = random_checkpoint(FLAGS.random_init) if FLAGS.random_init else FLAGS.model
    config = bench_config(FLAGS.config, model=model, mode=FLAGS.mode, batch=FLAGS.batch, seq=FLAGS.seq,
                          rank=FLAGS.rank, remat=FLAGS.remat, dtype=FLAGS.dtype, frozen_dtype=FLAGS.frozen_dtype,
                          scan_unroll=FLAGS.scan_unroll, loss_chunk=FLAGS.loss_chunk, quantize=FLAGS.quantize,
                          quantize_double=FLAGS.quantize_double)
    if FLAGS.compare == 'torch':
        check_torch_comparable(config)
    path = packaged.resolve(config.model.path)  # 'packaged:smollm2' -> the installed file, for torch too
    peak = matmul_peak(jnp.dtype(config.model.dtype))
    tokens = config.train.batch_size * config.data.max_length
    ours = bench_ftjax(config, FLAGS.steps, FLAGS.profile, FLAGS.warmup)
    rows = [summarize('ftjax', ours, tokens, peak)]
    if FLAGS.compare == 'torch':
        theirs = run_torch(config, path, ours['lora_modules'], FLAGS.steps, FLAGS.torch_remat)
        rows.append(summarize('torch+peft', theirs, tokens, peak))
    line = report(config, path, experiment_of(sys.argv), rows, peak, cpu_model())
    if FLAGS.out:
        with open(FLAGS.out, 'a') as f:
            f.write(line + '\n')
    print(line)


if __name__ == '__main__':
    sys.argv = with_default_experiment(sys.argv)
    console.run(main)
