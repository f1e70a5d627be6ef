"""scripts/bench.py end to end on the tiny Llama: the JSON line carries every figure (not its speed); its config
comes from the experiment and the `ftjax train` flags; the torch side (scripts/bench_torch.py) loads no jax."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ftjax import config as config_lib, peft
from ftjax.config import default_config
from ftjax.models import load_pretrained

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, 'experiments', 'quickstart.py')
FIELDS = ('step_s_median', 'step_s_min', 'step_s_max', 'tokens_per_s', 'flops_per_token', 'achieved_tflops',
          'mfu', 'matmul_peak_tflops', 'peak_mem_mb', 'compile_s', 'trainable_params')
SEVEN = ['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']
ENV = dict(os.environ, XLA_FLAGS='', HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1')


def run_script(*args, script='bench.py', check=True):
    out = subprocess.run([sys.executable, os.path.join(REPO, 'scripts', script), *args], env=ENV,
                         capture_output=True, text=True, timeout=600)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def run_bench(*args):
    out = run_script(*args)
    lines = out.stdout.strip().splitlines()
    assert lines[-2].startswith('| '), out.stdout  # the table comes right before the JSON line
    return json.loads(lines[-1]), out.stdout


def script_module(name):
    """scripts/<name>.py as a module (nothing is parsed)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'scripts', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def bench():
    """scripts/bench.py as a module (its absl flags join this process's)."""
    return script_module('bench')


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['lora',  # CI runs one mode: the JSON fields are the same code path for each
                                  pytest.param('full', marks=pytest.mark.variants),
                                  pytest.param('partial', marks=pytest.mark.variants)])
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
    ratio_line = next(line for line in stdout.splitlines() if line.startswith('ftjax vs torch+peft:'))
    assert 'cpu ' in ratio_line and 'matmul peak' in ratio_line  # the machine beside the ratio
    assert result['cpu_model'] in ratio_line


@pytest.mark.slow
def test_bench_takes_the_experiment_and_list_overrides(tiny_llama_dir):
    """--config + --config.KEY overrides as in `ftjax train` (a list key from repeated flags), the
    --batch_size / --seq_len aliases: only the q and v projections get adapters."""
    result, stdout = run_bench(f'--config={QUICKSTART}', f'--config.model.path={tiny_llama_dir}',
                               '--config.peft.lora.targets=q_proj$', '--config.peft.lora.targets=v_proj$',
                               '--config.peft.lora.rank=2', '--batch_size=2', '--seq_len=16', '--steps=1')
    c = default_config()
    c.peft.lora.rank, c.peft.lora.targets = 2, ['q_proj$', 'v_proj$']
    pre, _ = peft.prepare(load_pretrained(tiny_llama_dir), c, jax.random.key(0))
    adapters = sum(int(np.prod(x.shape)) for p, x in jax.tree_util.tree_flatten_with_path(pre.params)[0]
                   if str(getattr(p[-1], 'key', '')) in ('lora_a', 'lora_b'))
    assert result['trainable_params'] == adapters > 0
    assert (result['batch'], result['seq'], result['experiment']) == (2, 16, 'experiments/quickstart.py')
    assert 'mesh 1 device' in stdout


def test_bench_config_shortcuts(bench):
    """The short flags land on their config keys (None keeps the experiment's value); one device."""
    config = config_lib.load_config(QUICKSTART, [('peft.lora.targets', 'q_proj$'), ('peft.lora.targets', 'v_proj$'),
                                          ('mesh.fsdp', '2')])
    kept = bench.bench_config(config)
    assert (kept.peft.method, kept.peft.lora.rank, kept.peft.lora.alpha) == ('lora', 8, 16.0)
    assert list(kept.peft.lora.targets) == ['q_proj$', 'v_proj$']
    assert (kept.train.batch_size, kept.data.max_length, kept.model.path) == (8, 256, 'packaged:smollm2')
    assert [kept.mesh[a] for a in ('data', 'fsdp', 'tensor')] == [1, 1, 1]
    c = bench.bench_config(config, model='/m', mode='partial', batch=2, seq=16, rank=4, remat='none',
                           dtype='bfloat16', loss_chunk=64)
    assert (c.model.path, c.peft.method, c.train.batch_size, c.data.max_length) == ('/m', 'partial', 2, 16)
    assert (c.peft.lora.rank, c.peft.lora.alpha, c.model.remat, c.train.loss_chunk) == (4, 8.0, 'none', 64)
    assert (c.model.dtype, c.model.frozen_dtype, c.peft.last_n_blocks) == ('bfloat16', 'bfloat16', 2)
    assert bench.bench_config(config, dtype='bfloat16', frozen_dtype='float32').model.frozen_dtype == 'float32'
    assert config.train.batch_size == 8 and config.mesh.fsdp == 2  # the caller's config is unchanged
    with pytest.raises(ValueError, match='config.model.remat'):
        bench.bench_config(config, remat='sometimes')


def test_bench_argv_defaults_to_the_quickstart(bench):
    assert bench.with_default_experiment(['bench.py', '--steps=1'])[1] == f'--config={QUICKSTART}'
    argv = ['bench.py', '--config=experiments/x.py', '--steps=1']
    assert bench.with_default_experiment(argv) == argv
    assert bench.experiment_of([f'--config={QUICKSTART}']) == 'experiments/quickstart.py'


@pytest.mark.slow  # subprocesses
def test_bench_user_errors_are_one_line():
    for args, words in ((['--config.model.remt=none'], 'config.model.remat'),
                        (['--compare=torch', '--mode=partial'], 'config.peft.method=partial')):
        out = run_script(*args, check=False)
        assert out.returncode == 2 and words in out.stderr, out.stderr[-2000:]
        assert out.stderr.strip().splitlines()[-1].startswith('ftjax: error:'), out.stderr[-2000:]


def test_torch_adapters_are_ftjax_adapters(bench, tiny_llama_dir):
    """PEFT's target_modules are the modules that carry ftjax's adapters, as transformers names them."""
    for targets, expected in ((None, SEVEN), (['q_proj$', 'v_proj$'], ['q_proj', 'v_proj'])):
        c = default_config()
        if targets:
            c.peft.lora.targets = targets
        pre, _ = peft.prepare(load_pretrained(tiny_llama_dir), c, jax.random.key(0))
        assert bench.adapter_modules(pre.params, pre.config) == expected


def test_torch_side_loads_no_jax(tiny_llama_dir):
    """scripts/bench_torch.py runs (one step on the tiny Llama) without importing jax or ftjax: its peak RSS is
    that of torch alone."""
    pytest.importorskip('torch')
    pytest.importorskip('peft')
    code = ("import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'ftjax', 'flax')); "
            "assert not bad, bad")
    out = subprocess.run([sys.executable, '-c', code, os.path.join(REPO, 'scripts', 'bench_torch.py'),
                          f'--model={tiny_llama_dir}', '--mode=lora', '--rank=2', '--alpha=4', '--targets=q_proj,v_proj',
                          '--batch=2', '--seq=8', '--steps=1'], env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result['times']) == 1 and result['peak_mb'] > 0 and np.isfinite(result['loss'])


def test_flop_counts_follow_the_mode(bench, tiny_llama_dir):
    """Matmul parameters split into trainable / frozen as the mode says (LastLayers counted by layer)."""
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


@pytest.fixture(scope='module')
def bench_generate():
    return script_module('bench_generate')


@pytest.mark.parametrize('rows', [1, 2])  # the engine's two layouts: kernels [in, out] at one row, [out, in] from two
def test_generate_floor_runs_the_engines_weight_products(bench_generate, tiny_llama_dir, rows):
    """The floor's products (`weight_products`, on the engine's fused, transposed buffers) equal the same products
    of the stacked checkpoint weights: q of q|k|v, o, gate|up, down per layer, then the LM head."""
    pre = load_pretrained(tiny_llama_dir, jax.numpy.float32)
    cfg = pre.config
    engine = bench_generate.Sampler(pre, batch_size=rows, eos_ids=[])
    _, per_layer = engine.buffers()
    x = np.random.default_rng(0).standard_normal((rows, cfg.hidden_size)).astype(np.float32)
    out = np.asarray(jax.jit(lambda x, p, h: bench_generate.weight_products(cfg, x, p, h))(
        x, per_layer, bench_generate.engine_head(engine)))  # [rows, vocab]
    w = jax.tree.map(np.asarray, pre.params['layers'])
    h = x
    for i in range(cfg.num_layers):
        h = h + (h @ w['q_proj']['kernel'][i]) @ w['o_proj']['kernel'][i]
        gate, up = h @ w['gate_proj']['kernel'][i], h @ w['up_proj']['kernel'][i]
        h = h + (gate / (1 + np.exp(-gate)) * up) @ w['down_proj']['kernel'][i]
    expected = h @ np.asarray(bench_generate.heads.lm_head_kernel(pre.params, cfg))  # [rows, vocab]
    assert out.shape == expected.shape == (rows, cfg.vocab_size)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert np.abs(bench_generate.step_matmuls(engine, 2)() - 1).max() > 0  # the loop runs these products
