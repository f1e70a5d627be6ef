r"""Training-step benchmark: ftjax (and optionally transformers + PEFT) on the same model, batch and machine.

  python scripts/bench.py --model=PATH --mode=lora --batch=8 --seq=256 --steps=4 [--compare=torch]
      [--remat=full] [--dtype=float32] [--rank=8] [--random_init=smollm2|llama1b]

Builds the real train step (the code path of `ftjax.train`) on random token batches, excludes
compilation, times --steps steps after one warm-up step and prints a table: step time (median, min,
max), tokens/s, model FLOPs per token, achieved FLOP/s, MFU against a matmul peak measured in the
same run (one large matmul in the compute dtype on the same device), peak memory and compile time.
FLOPs convention: a weight that trains costs 6 FLOPs per parameter per token (forward 2, backward 4),
a frozen weight 4 (forward 2, gradient w.r.t. activations 2), attention scores and values
12 * layers * seq * heads * head_dim per token (PaLM's count, causal mask not discounted); the
embedding lookup is free. The last line is one JSON object with all figures.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

RANDOM_SHAPES = {  # Llama-shaped models with random weights (no download)
    'smollm2': dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    'llama1b': dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    'tiny': dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}
HF_TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default=None, help='HF directory or .gguf (default: the packaged SmolLM2)')
    p.add_argument('--random_init', default=None, choices=sorted(RANDOM_SHAPES),
                   help='a Llama-shaped model with random weights instead of --model')
    p.add_argument('--mode', default='lora', choices=['full', 'lora', 'partial'])
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--seq', type=int, default=256)
    p.add_argument('--steps', type=int, default=4)
    p.add_argument('--rank', type=int, default=8)
    p.add_argument('--remat', default='full', help="ftjax's remat policy (default: the trainer's default, 'full')")
    p.add_argument('--torch_remat', action='store_true', help='gradient checkpointing for the torch run too '
                   '(default off: torch at its fastest)')
    p.add_argument('--dtype', default='float32', help='compute dtype (bfloat16 on GPU/TPU)')
    p.add_argument('--frozen_dtype', default=None, help='storage dtype of frozen weights (default: --dtype)')
    p.add_argument('--scan_unroll', type=int, default=1)
    p.add_argument('--loss_chunk', type=int, default=512)
    p.add_argument('--compare', default=None, choices=[None, 'torch'])
    p.add_argument('--torch_only', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--out', default=None, help='also append the JSON line to this file')
    p.add_argument('--profile', default=None, help='write a profiler trace of one extra step to this directory '
                   '(TensorBoard / Perfetto)')
    return p.parse_args()


def model_source(args):
    """A path for both frameworks: the given model, the packaged SmolLM2, or a random checkpoint."""
    if args.random_init:
        path = os.path.join('/tmp', f'ftjax_bench_{args.random_init}')
        if not os.path.exists(os.path.join(path, 'config.json')):
            write_random_checkpoint(path, RANDOM_SHAPES[args.random_init])
        return path
    if args.model:
        return args.model
    from ftjax.models import packaged
    return packaged.smollm2_gguf()


def write_random_checkpoint(path, shape):
    """A random Llama as a HF directory, written with numpy (no torch needed)."""
    import numpy as np
    from safetensors.numpy import save_file
    from ftjax.models import LlamaConfig, abstract_variables, build_model
    from ftjax.models import convert
    import flax.linen as nn
    os.makedirs(path, exist_ok=True)
    hf = dict(shape, model_type='llama', architectures=['LlamaForCausalLM'], rms_norm_eps=1e-5,
              rope_theta=10000.0, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
    cfg = LlamaConfig.from_hf(hf)
    shapes = nn.unbox(abstract_variables(build_model(cfg)))['params']
    rng = np.random.default_rng(0)
    import jax
    params = jax.tree.map(lambda s: (rng.standard_normal(s.shape, np.float32) * 0.02), shapes)
    save_file(convert.params_to_hf(params, convert.llama_table(cfg), cfg.num_layers), os.path.join(path,
              'model.safetensors'), metadata={'format': 'pt'})
    with open(os.path.join(path, 'config.json'), 'w') as f:
        json.dump(hf, f)


def reset_peak_rss():
    """Start a new peak-RSS window (Linux: VmHWM := current RSS), so that loading the checkpoint and
    compiling do not count; what stays resident (weights, optimizer state) still does."""
    import gc
    gc.collect()
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def peak_rss_mb():
    """Peak resident memory of this process in MiB since `reset_peak_rss` (or since start)."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def matmul_peak(dtype, n=2048, reps=5):
    """FLOP/s of one large matmul in `dtype` on the default device (the MFU denominator)."""
    import jax
    import jax.numpy as jnp
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / min(times)


def flops_per_token(cfg, n_trainable_mm, n_frozen_mm, seq):
    attn = 12 * cfg.num_layers * seq * cfg.num_heads * cfg.head_dim
    return 6 * n_trainable_mm + 4 * n_frozen_mm + attn


def matmul_params(params, mask, tied):
    """(trainable, frozen) parameter counts of matrix weights, as used per token.

    The embedding table counts only when it is also the LM head (`tied`); a `LastLayers(n)` mask
    leaf counts n of its L stacked layers as trainable and the rest as frozen; vectors (norms,
    biases, DoRA magnitudes, also when stacked per layer) are not matmuls and do not count.
    """
    import jax
    import numpy as np
    from ftjax.peft import LastLayers
    t = f = 0
    flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
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


def bench_ftjax(args, path):
    import jax
    import numpy as np
    from ftjax import optim, peft, state as state_lib
    from ftjax.config import default_config
    from ftjax.models import load_pretrained
    from ftjax.models.adapters import DEFAULT_TARGETS  # every attention and MLP projection, as HF_TARGETS
    from ftjax.train_step import make_train_step
    c = default_config()
    c.model.path = path
    c.model.dtype = args.dtype
    c.model.frozen_dtype = args.frozen_dtype or args.dtype
    c.model.remat = args.remat
    c.peft.method = args.mode
    c.peft.lora.rank = args.rank
    c.peft.lora.alpha = 2.0 * args.rank
    c.peft.lora.targets = list(DEFAULT_TARGETS)
    if args.mode == 'partial':
        c.peft.last_n_blocks = 2  # the last two blocks train whole, the rest is frozen
    c.train.loss_chunk = args.loss_chunk
    c.train.batch_size = args.batch
    c.data.max_length = args.seq
    c.optim.clip_norm = 1.0
    pre = load_pretrained(path, dtype='float32', compute_dtype=args.dtype, remat=args.remat,
                          scan_unroll=args.scan_unroll)
    pre, mask = peft.prepare(pre, c, jax.random.key(0))
    n_tr, n_fr = matmul_params(pre.params, mask, getattr(pre.config, 'tie_embeddings', False))
    trainable, _ = state_lib.partition(pre.params, mask)
    tx, sched = optim.make_optimizer(c, trainable, 1000)
    state = jax.jit(lambda p: state_lib.create_state(p, mask, tx, c.model.frozen_dtype))(pre.params)
    step = jax.jit(make_train_step(pre.model, c, tx, sched), donate_argnums=0)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, pre.config.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
    batch = {'input_ids': ids[:, :-1], 'target_ids': ids[:, 1:], 'loss_mask': np.ones((args.batch, args.seq),
             np.float32), 'segment_ids': np.ones((args.batch, args.seq), np.int32),
             'positions': np.broadcast_to(np.arange(args.seq, dtype=np.int32), (args.batch, args.seq)).copy()}
    key = jax.random.key(1)
    t = time.perf_counter()
    compiled = step.lower(state, batch, key).compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    model_cfg = pre.config
    del pre, trainable  # host copies of the weights: only the device state stays
    reset_peak_rss()
    batch = jax.device_put(batch)  # the trainer prefetches its batches onto the devices as well
    keys = [jax.random.fold_in(key, i) for i in range(args.steps)]
    state, m = compiled(state, batch, key)
    jax.block_until_ready((state, m))
    times = []
    for i in range(args.steps):
        t = time.perf_counter()
        state, m = compiled(state, batch, keys[i])
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t)
    if args.profile:
        with jax.profiler.trace(args.profile, create_perfetto_trace=True):
            state, m = compiled(state, batch, key)
            jax.block_until_ready(m)
        with open(os.path.join(args.profile, 'train_step.hlo.txt'), 'w') as f:
            f.write(compiled.as_text())
    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != 'cpu' else None
    peak_mb = stats['peak_bytes_in_use'] / 2 ** 20 if stats and 'peak_bytes_in_use' in stats else peak_rss_mb()
    fpt = flops_per_token(model_cfg, n_tr, n_fr, args.seq)
    return dict(times=times, compile_s=compile_s, peak_mb=peak_mb,
                peak_kind='device' if stats else 'rss', flops_per_token=fpt,
                compiled_temp_mb=getattr(mem, 'temp_size_in_bytes', 0) / 2 ** 20 if mem else None,
                trainable_params=n_tr, loss=float(m['loss']), device=f'{dev.platform}:{dev.device_kind}')


def bench_torch(args, path):
    """transformers + PEFT (PyTorch) on the same weights, batch, AdamW and LoRA targets/rank."""
    import torch
    import transformers
    torch.manual_seed(0)
    dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[args.dtype]
    kw = dict(dtype=dtype)
    if path.endswith('.gguf'):
        model = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                                                  gguf_file=os.path.basename(path), **kw)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **kw)
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    model.to(dev).train()
    if args.mode == 'lora':
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                           target_modules=HF_TARGETS, lora_dropout=0.0))
    if args.torch_remat:
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=dev)
    reset_peak_rss()
    times = []
    for i in range(args.steps + 1):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev == 'cuda':
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if dev == 'cuda' else peak_rss_mb()
    return dict(times=times, peak_mb=peak, loss=float(loss))


def summarize(name, r, tokens, peak_flops):
    med = statistics.median(r['times'])
    out = {'name': name, 'step_s_median': med, 'step_s_min': min(r['times']), 'step_s_max': max(r['times']),
           'tokens_per_s': tokens / med, 'peak_mem_mb': r['peak_mb']}
    if 'flops_per_token' in r:
        achieved = r['flops_per_token'] * tokens / med
        out.update(flops_per_token=r['flops_per_token'], achieved_tflops=achieved / 1e12,
                   mfu=achieved / peak_flops, compile_s=r['compile_s'], peak_kind=r['peak_kind'],
                   compiled_temp_mb=r['compiled_temp_mb'], trainable_params=r['trainable_params'],
                   device=r['device'])
    return out


def main():
    args = parse()
    path = model_source(args)
    if args.torch_only:
        print(json.dumps(bench_torch(args, path)))
        return
    import jax.numpy as jnp
    peak = matmul_peak(jnp.dtype(args.dtype))
    tokens = args.batch * args.seq
    rows = [summarize('ftjax', bench_ftjax(args, path), tokens, peak)]
    if args.compare == 'torch':
        cmd = [sys.executable, os.path.abspath(__file__), '--torch_only'] + [a for a in sys.argv[1:]
                                                                            if not a.startswith('--compare')]
        if args.random_init is None and args.model is None:
            cmd.append(f'--model={path}')
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(summarize('torch+peft', json.loads(out.stdout.strip().splitlines()[-1]), tokens, peak))
    print(f"\nmodel {path} | mode {args.mode} | batch {args.batch} x seq {args.seq} | dtype {args.dtype} | "
          f"remat {args.remat} | matmul peak {peak / 1e9:.1f} GFLOP/s")
    print('| impl | step s (median / min / max) | tokens/s | TFLOP/s | MFU | peak MB | compile s |')
    print('|---|---|---|---|---|---|---|')
    for r in rows:
        print(f"| {r['name']} | {r['step_s_median']:.3f} / {r['step_s_min']:.3f} / {r['step_s_max']:.3f} | "
              f"{r['tokens_per_s']:,.0f} | {r.get('achieved_tflops', float('nan')):.3f} | "
              f"{r.get('mfu', float('nan')):.1%} | {r['peak_mem_mb']:,.0f} | {r.get('compile_s', float('nan')):.1f} |")
    result = dict(rows[0], mode=args.mode, batch=args.batch, seq=args.seq, dtype=args.dtype, remat=args.remat,
                  matmul_peak_tflops=peak / 1e12)
    if len(rows) > 1:
        result.update(torch_tokens_per_s=rows[1]['tokens_per_s'], torch_peak_mem_mb=rows[1]['peak_mem_mb'],
                      speedup_vs_torch=rows[0]['tokens_per_s'] / rows[1]['tokens_per_s'],
                      memory_ratio_vs_torch=rows[0]['peak_mem_mb'] / rows[1]['peak_mem_mb'])
    line = json.dumps(result)
    if args.out:
        with open(args.out, 'a') as f:
            f.write(line + '\n')
    print(line)


if __name__ == '__main__':
    main()
