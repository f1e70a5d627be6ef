r"""What sets a CPU speed ratio: this machine's CPU, and jax's vs torch's matmuls on the bench's own shapes.

  python scripts/cpu_probe.py [--reps=5] [--cores=1,2] [--libs=jax,torch]

`scripts/bench.py --compare=torch` divides ftjax's step time by transformers+PEFT's. Both spend most of a step
in float32 matmuls, done by different libraries (jax: XLA's CPU backend with its YNNPACK/Eigen kernels; torch:
its BLAS, MKL/oneDNN on x86), so the ratio moves with how fast each library's matmuls are on the CPU at hand:
its vector ISA (AVX2 or AVX-512), the core count, the cache sizes. This script prints, for one machine:

  * the CPU: model name, family/model number (AMD: 25/1 = Zen 3 "Milan", 25/17 = Zen 4 "Genoa", 26 = Zen 5),
    the vector ISA flags, the cores this process may use, the caches;
  * GFLOP/s of each library on the matmuls of the SmolLM2-135M bench step (batch 8 x 256 = 2048 rows:
    hidden 576, intermediate 1536, vocabulary 49152, LoRA rank 8) and a square 2048^3 one (the MFU denominator
    bench.py uses), on 1 core and on every core (each in its own subprocess pinned with sched_setaffinity, so
    that both libraries see the same cores);
  * the ratio jax/torch per shape, which is what the bench ratio is made of.

Torch is a test extra: without it the torch columns are empty. Nothing here is a test; it prints numbers.
"""
import argparse
import json
import os
import subprocess
import sys
import time

# [rows, inner] @ [inner, cols]: the bench step's matmuls (forward shapes; the backward ones are transposes)
SHAPES = {
    'square 2048^3': (2048, 2048, 2048),
    'q/o proj 576->576': (2048, 576, 576),
    'gate/up 576->1536': (2048, 576, 1536),
    'down 1536->576': (2048, 1536, 576),
    'lm head 576->49152': (2048, 576, 49152),
    'lora_a 576->8': (2048, 576, 8),
}


def cpu_info():
    """{model, family, model_number, isa, cores, caches} of this machine, from /proc/cpuinfo and sysfs."""
    fields = {}
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if ':' in line:
                    key, value = (s.strip() for s in line.split(':', 1))
                    fields.setdefault(key, value)
    except OSError:
        pass
    flags = set(fields.get('flags', '').split())
    isa = [f for f in ('avx2', 'fma', 'avx512f', 'avx512bw', 'avx512_vnni', 'avx512_bf16', 'amx_bf16', 'amx_tile')
           if f in flags]
    caches = {}
    for index in range(8):
        base = f'/sys/devices/system/cpu/cpu0/cache/index{index}'
        try:
            with open(f'{base}/level') as f_level, open(f'{base}/type') as f_type, open(f'{base}/size') as f_size:
                caches[f'L{f_level.read().strip()}{f_type.read().strip()[0].lower()}'] = f_size.read().strip()
        except OSError:
            break
    return {'model': fields.get('model name', 'unknown'), 'family': fields.get('cpu family'),
            'model_number': fields.get('model'), 'isa': isa, 'cores': len(os.sched_getaffinity(0)),
            'caches': caches}


def time_matmuls(lib, reps):
    """{shape name: GFLOP/s} of `lib` on SHAPES in this process (best of `reps`, after one warm-up call)."""
    out = {}
    if lib == 'jax':
        import jax
        import jax.numpy as jnp
        f = jax.jit(lambda x, y: x @ y)
        for name, (m, k, n) in SHAPES.items():
            a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
            f(a, b).block_until_ready()
            best = min(_timed(lambda: f(a, b).block_until_ready()) for _ in range(reps))
            out[name] = 2 * m * k * n / best / 1e9
    else:
        import torch
        for name, (m, k, n) in SHAPES.items():
            a, b = torch.ones(m, k), torch.ones(k, n)
            a @ b
            best = min(_timed(lambda: a @ b) for _ in range(reps))
            out[name] = 2 * m * k * n / best / 1e9
        out['threads'] = torch.get_num_threads()
        out['blas'] = 'mkl' if torch.backends.mkl.is_available() else 'no mkl'
    return out


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def child(lib, cores, reps):
    """Run `time_matmuls` in a subprocess pinned to the first `cores` cores; its JSON result (None: lib absent)."""
    code = (f'import os, json, sys; os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:{cores}])); '
            f'sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); import cpu_probe; '
            f'print("RESULT", json.dumps(cpu_probe.time_matmuls({lib!r}, {reps})))')
    env = dict(os.environ, JAX_PLATFORMS='cpu', OMP_NUM_THREADS=str(cores), MKL_NUM_THREADS=str(cores))
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith('RESULT ')]
    if proc.returncode or not lines:
        print(f'{lib} on {cores} core(s): not measured ({(proc.stderr.strip().splitlines() or ["?"])[-1]})')
        return None
    return json.loads(lines[-1][len('RESULT '):])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--reps', type=int, default=5)
    parser.add_argument('--cores', default=f'1,{len(os.sched_getaffinity(0))}')
    parser.add_argument('--libs', default='jax,torch')
    args = parser.parse_args()
    info = cpu_info()
    print(f"CPU: {info['model']} (family {info['family']} model {info['model_number']}), "
          f"ISA: {' '.join(info['isa']) or 'none of avx2/avx512/amx'}, {info['cores']} cores, caches {info['caches']}")
    print(f"load: {os.getloadavg()[0]:.2f} (1-minute average; a loaded machine makes every column smaller)")
    libs = args.libs.split(',')
    results = {}
    for cores in sorted({int(c) for c in args.cores.split(',')}):
        for lib in libs:
            results[(lib, cores)] = child(lib, cores, args.reps)
    header = ' | '.join(f'{lib} {cores}c' for lib, cores in results) + ' | jax/torch per core count'
    print(f'\n| matmul (GFLOP/s, float32) | {header} |')
    print('|---' * (len(results) + 2) + '|')
    for name in SHAPES:
        cells = [f'{r[name]:.1f}' if r else '' for r in results.values()]
        ratios = [f"{results[('jax', c)][name] / results[('torch', c)][name]:.2f}"
                  for c in sorted({c for _, c in results})
                  if results.get(('jax', c)) and results.get(('torch', c))]
        print(f"| {name} | {' | '.join(cells)} | {' / '.join(ratios)} |")
    torch_meta = {c: (r['threads'], r['blas']) for (lib, c), r in results.items() if lib == 'torch' and r}
    if torch_meta:
        print(f'torch threads / BLAS per core count: {torch_meta}')
    print(json.dumps({'cpu': info, 'load': os.getloadavg()[0],
                      'gflops': {f'{lib}/{cores}': r for (lib, cores), r in results.items()}}))


if __name__ == '__main__':
    main()
