"""scripts/bench.py end to end on the tiny Llama: the JSON line carries every figure (not its speed)."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ('step_s_median', 'step_s_min', 'step_s_max', 'tokens_per_s', 'flops_per_token', 'achieved_tflops',
          'mfu', 'matmul_peak_tflops', 'peak_mem_mb', 'compile_s', 'trainable_params')


def run_bench(*args):
    env = dict(os.environ, XLA_FLAGS='', HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1')
    out = subprocess.run([sys.executable, os.path.join(REPO, 'scripts', 'bench.py'), *args], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-2].startswith('| '), out.stdout  # the table comes right before the JSON line
    return json.loads(lines[-1]), out.stdout


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['lora', 'full', 'partial'])
def test_bench_json_fields(tiny_llama_dir, mode):
    result, _ = run_bench(f'--model={tiny_llama_dir}', f'--mode={mode}', '--batch=2', '--seq=16', '--steps=2',
                          '--rank=4')
    for name in FIELDS:
        assert name in result, name
        assert result[name] > 0, (name, result[name])
    assert result['mode'] == mode and result['batch'] == 2 and result['seq'] == 16
    assert result['step_s_min'] <= result['step_s_median'] <= result['step_s_max']


@pytest.mark.slow
def test_bench_compare_torch(tiny_llama_dir):
    pytest.importorskip('torch')
    pytest.importorskip('peft')
    result, stdout = run_bench(f'--model={tiny_llama_dir}', '--mode=lora', '--batch=2', '--seq=16', '--steps=2',
                               '--rank=4', '--compare=torch')
    assert '| torch+peft |' in stdout
    for name in ('torch_tokens_per_s', 'torch_peak_mem_mb', 'speedup_vs_torch', 'memory_ratio_vs_torch'):
        assert result[name] > 0, (name, result[name])


def test_flop_counts_follow_the_mode(tiny_llama_dir):
    """Matmul parameters split into trainable / frozen as the mode says (LastLayers counted by layer)."""
    import importlib.util

    import jax
    import numpy as np
    from ftjax import peft
    from ftjax.config import default_config
    from ftjax.models import load_pretrained
    spec = importlib.util.spec_from_file_location('bench', os.path.join(REPO, 'scripts', 'bench.py'))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    counts, pres = {}, {}
    for mode in ('full', 'lora', 'partial'):
        c = default_config()
        c.peft.method = mode
        c.peft.last_n_blocks = 1 if mode == 'partial' else 0
        pre, mask = peft.prepare(load_pretrained(tiny_llama_dir), c, jax.random.key(0))
        counts[mode], pres[mode] = bench.matmul_params(pre.params, mask, pre.config.tie_embeddings), pre
        flat = jax.tree_util.tree_flatten_with_path(pre.params)[0]
        matrices = sum(int(np.prod(x.shape)) for p, x in flat if str(p[-1].key) in ('kernel', 'embedding', 'lora_a', 'lora_b'))
        assert sum(counts[mode]) == matrices, mode  # tied: the embedding is the LM head and counts
    assert counts['full'][1] == 0
    stacked = [x for x in jax.tree.leaves(pres['partial'].params['layers']) if x.ndim >= 3]  # [layers, in, out]
    per_layer = sum(int(np.prod(x.shape[1:])) for x in stacked)
    assert counts['partial'][0] == per_layer  # the last of the stacked layers trains, whole
    adapters = sum(int(np.prod(x.shape)) for p, x in jax.tree_util.tree_flatten_with_path(pres['lora'].params)[0]
                   if str(getattr(p[-1], 'key', '')) in ('lora_a', 'lora_b'))
    assert adapters > 0 and counts['lora'][0] == adapters
