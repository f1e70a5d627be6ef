"""Compiling the real train step for a TPU topology with libtpu's compiler, on a machine without a TPU.

The model has SmolLM2-135M's published dimensions (experiments/shapes/smollm2-135m/config.json: vocabulary,
width, heads, GQA, head_dim 64) with 2 of its 30 layers, so the compile stays short; LoRA, bfloat16 compute,
bfloat16 frozen storage, batch 4 x 256 on v5e:2x2 (4 chips, data=4). Skips when libtpu is not installed
(`pip install -e '.[tpu]'`; CI installs it).
"""
import json
import os
import re
import subprocess
import sys

import jax
import pytest

from ftjax import compile_check, sharding
from ftjax.config import default_config
from ftjax.models import kernels
from tests.tiny import REPO

pytest.importorskip('libtpu', reason="libtpu is not installed: pip install -e '.[tpu]'")

TOPOLOGY, BATCH, SEQ, WIDTH = 'v5e:2x2', 4, 256, 576
SMOLLM2 = os.path.join(REPO, 'experiments', 'shapes', 'smollm2-135m', 'config.json')


def smollm2_dir(tmp_path, layers=2):
    with open(SMOLLM2) as f:
        cfg = json.load(f)
    cfg['num_hidden_layers'] = layers
    (tmp_path / 'config.json').write_text(json.dumps(cfg))
    return str(tmp_path)


def smollm2_config(path, method='lora'):
    c = default_config()
    c.model.path = path
    c.model.dtype, c.model.frozen_dtype = 'bfloat16', 'bfloat16'
    c.peft.method = method
    c.data.path = 'synthetic:extract_json/train.jsonl'  # required by the schema; compile_check reads no data
    c.train.batch_size, c.data.max_length = BATCH, SEQ
    return c


@pytest.fixture(scope='module')
def lora_step(tmp_path_factory):
    """(report, compiled HLO text) of the SmolLM2-shaped LoRA step compiled for v5e:2x2."""
    devices = compile_check.tpu_devices(TOPOLOGY)
    config = smollm2_config(smollm2_dir(tmp_path_factory.mktemp('smollm2')))
    sizes = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, len(devices))))
    with jax.default_matmul_precision('default'):  # as in training (tests/conftest.py sets 'highest' for the CPU)
        report = compile_check.check(config, sizes, devices, topology_name=TOPOLOGY, keep_compiled=True)
    return report, report.pop('compiled').as_text()


def test_lora_step_compiles_for_v5e_with_splash_attention(lora_step):
    report, hlo = lora_step
    print(compile_check.format_report(report))
    assert report['platform'] == 'tpu' and report['devices'] == 4 and report['mesh']['data'] == 4
    assert report['kernels'] == 'splash' and report['attention'] == 'splash'
    splash_calls = [line for line in hlo.splitlines()
                    if 'custom_call_target="tpu_custom_call"' in line and 'splash' in line]
    assert splash_calls, 'no splash-attention custom call in the compiled HLO'
    assert kernels.kernel_names_in(hlo) == ['splash']
    b = report['per_device_bytes']
    assert b['total'] == b['arguments'] + b['output'] - report['alias_bytes'] + b['temp'] > 0
    assert report['hbm_bytes'] == 16 << 30 and report['fits'] is True
    assert report['flops_per_step'] > 0 and 0 < report['estimate']['step_s'] < 1


def _materialised(hlo, dims):
    """Result types naming `dims` of instructions outside fusion bodies (buffers the program writes),
    grouped by dtype: {'f32': [...], 'bf16': [...]}."""
    found, fused = {}, False
    for line in hlo.splitlines():
        if line and not line.startswith(' ') and line.rstrip().endswith('{'):  # a computation's header
            fused = 'fused' in line.split(' ')[0] or 'fusion' in line.split(' ')[0]
            continue
        m = re.match(r'\s*(?:ROOT )?%\S+ = (\(.*?\)|\S+) ', line)
        if fused or not m:
            continue
        for dtype, shape in re.findall(r'(\w+)\[([\d,]*)\]', m.group(1)):
            if shape == dims:
                found.setdefault(dtype, []).append(line.strip()[:160])
    return found


def test_bf16_hot_path_keeps_activations_in_bf16(lora_step):
    """model.dtype=bfloat16: no [batch/device, seq, embed] activation is written in float32 (the norms and the
    softmax compute in float32 inside their fusions only); the bfloat16 ones are found, so the check looks."""
    _, hlo = lora_step
    found = _materialised(hlo, f'{BATCH // 4},{SEQ},{WIDTH}')
    assert found.get('bf16'), 'the parser found no bf16 [batch, seq, embed] activations at all'
    assert not found.get('f32'), '\n'.join(found['f32'][:10])


@pytest.mark.slow
def test_command_line_prints_the_summary_json(tmp_path):
    path = smollm2_dir(tmp_path, layers=1)
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    out = subprocess.run([sys.executable, '-m', 'ftjax', 'compile_check', '--config=experiments/quickstart.py',
                          f'--config.model.path={path}', f'--topology={TOPOLOGY}', '--config.model.dtype=bfloat16',
                          '--config.model.frozen_dtype=bfloat16', '--config.peft.method=full',
                          f'--config.train.batch_size={BATCH}', f'--config.data.max_length={SEQ}'],
                         cwd=REPO, env=dict(env, PYTHONPATH=REPO), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    assert 'fits: true' in out.stdout and 'attention: splash' in out.stdout, out.stdout
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary['platform'] == 'tpu' and summary['topology'] == TOPOLOGY and summary['devices'] == 4
    assert summary['attention'] == 'splash' and summary['fits'] is True and summary['hbm_bytes'] == 16 << 30
    assert set(summary['per_device_bytes']) == {'arguments', 'output', 'temp', 'total'}
    assert summary['flops_per_step'] > 0 and 'estimate' in summary['estimate']['basis']
