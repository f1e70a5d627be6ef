"""`ftjax.compile_check`: compiles the train step for a topology without weights; its per-device bytes
are what the trainer really places."""
import itertools
import math
import os
import subprocess
import sys

import jax
import pytest

from ftjax import build, compile_check, optim, sharding
from ftjax.errors import ConfigError
from ftjax.state import partition
from tests.tiny import REPO, make_moe_checkpoint, tiny_config, write_experiment
from tests.tiny_gguf import write_tiny_gguf


def _shard_bytes(tree):
    """Bytes on the first device of every array of a placed tree."""
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('topology,method', [  # the fast lane: LoRA on all three axes
    case if case == ('data=2,fsdp=2,tensor=2', 'lora') else pytest.param(*case, marks=pytest.mark.slow)
    for case in itertools.product(['data=2,fsdp=2,tensor=2', 'fsdp=4'], ['lora', 'full'])])
def test_compiles_and_counts_what_the_trainer_places(tiny_llama_dir, chat_data, monkeypatch, method,
                                                     topology):
    check_against_trainer(tiny_config(tiny_llama_dir, chat_data, **{'peft.method': method, 'train.batch_size': 8}),
                          topology, monkeypatch)


@pytest.mark.parametrize('method', ['lora', pytest.param('full', marks=[pytest.mark.slow, pytest.mark.variants])])
def test_moe_with_expert_parallelism(chat_data, monkeypatch, method, tmp_path):
    """A tiny Qwen2-MoE (8 experts, a shared expert), LoRA on attention and every expert, experts over expert=4."""
    path = make_moe_checkpoint(str(tmp_path / 'moe'), 'qwen2_moe')
    config = tiny_config(path, chat_data, **{'peft.method': method, 'train.batch_size': 8})
    report = check_against_trainer(config, 'fsdp=2,expert=4', monkeypatch)
    assert report['mesh']['expert'] == 4


def check_against_trainer(config, topology, monkeypatch):
    """compile_check's report of `config` on fake CPU devices, checked against the state the trainer places."""
    topo = compile_check.parse_topology(topology)
    from ftjax.models import loading
    with monkeypatch.context() as m:  # no weights are read
        m.setattr(loading, 'read_safetensors', lambda *a: pytest.fail('compile_check read the weights'))
        report = compile_check.check(config, topo)
    assert report['mesh'] == topo and config.mesh.tensor == -1  # the caller's config is left alone
    print(compile_check.format_report(report))

    pre, mask = build.build_model_and_mask(config)  # the real thing, on the same mesh
    mesh = sharding.make_mesh(topo, jax.devices()[:math.prod(topo.values())])
    tx, _ = optim.make_optimizer(config, partition(pre.params, mask)[0], config.train.steps)
    state, _ = build.sharded_state(pre, mask, tx, config, mesh, sharding.rules_from_config(config.mesh.rules))
    assert report['trainable_bytes'] == _shard_bytes(state.trainable)
    assert report['frozen_bytes'] == _shard_bytes(state.frozen)
    assert report['optimizer_bytes'] == _shard_bytes(state.opt_state)
    assert report['trainable_params'] == sum(x.size for x in jax.tree.leaves(state.trainable))
    state_bytes = report['trainable_bytes'] + report['frozen_bytes'] + report['optimizer_bytes']
    assert report['argument_bytes'] >= state_bytes and report['temp_bytes'] > 0
    assert report['alias_bytes'] >= report['trainable_bytes']  # the donated state is updated in place
    return report


def test_gguf_metadata_gives_the_same_architecture(tiny_llama_dir, tmp_path):
    from ftjax.models import llama
    path = str(tmp_path / 'tiny.gguf')
    write_tiny_gguf(tiny_llama_dir, path)
    from_gguf = llama.LlamaConfig.from_hf(compile_check.hf_config_of(path))
    assert from_gguf == llama.LlamaConfig.from_hf(compile_check.hf_config_of(tiny_llama_dir))


def test_topology_errors():
    assert compile_check.parse_topology('data=4,tensor=2') == {'data': 4, 'fsdp': 1, 'tensor': 2, 'context': 1,
                                                                     'expert': 1}
    for bad in ('data=0', 'model=2', 'data=two', 'data'):
        with pytest.raises(ValueError, match='--topology'):
            compile_check.parse_topology(bad)


@pytest.mark.slow  # a subprocess; the same check in-process stays in the fast lane
def test_command_line(tiny_llama_dir, chat_data, tmp_path):
    exp = write_experiment(tmp_path / 'exp.py', tiny_llama_dir, chat_data, **{'train.batch_size': 8})
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # it sets up its own 8 devices
    out = subprocess.run([sys.executable, '-m', 'ftjax', 'compile_check', f'--config={exp}',
                          '--topology=data=4,fsdp=2,tensor=1'], cwd=REPO, env=dict(env, PYTHONPATH=REPO),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert 'mesh data=4, fsdp=2, tensor=1, context=1, expert=1 = 8 devices' in out.stdout, out.stdout
    for line in ('trainable params', 'frozen params', 'optimizer state', 'arguments', 'temporaries',
                 'generated code'):
        assert line in out.stdout


@pytest.mark.slow  # six compiles
def test_estimate_finds_the_largest_batch_that_fits(tiny_llama_dir, chat_data):
    """With a budget between the totals of 2 and 3 rows per device, the search answers 2 (and per policy)."""
    config = tiny_config(tiny_llama_dir, chat_data, **{'peft.method': 'full', 'data.max_length': 64})
    topo = compile_check.parse_topology('data=2')
    total = {}
    for rows in (2, 3):
        c = config.copy_and_resolve_references()
        c.train.batch_size, c.model.remat = 2 * rows, 'offload_layer_inputs'
        total[rows] = compile_check.check(c, topo)['per_device_bytes']['total']
    assert total[2] < total[3]
    budget = (total[2] + total[3]) // 2
    found = compile_check.estimate(config, topo, policies=['offload_layer_inputs'], budget_bytes=budget, max_rows=8)
    (only,) = found
    assert only['rows'] == 2 and only['report']['per_device_bytes']['total'] == total[2] and not only['capped']
    assert only['compiles'] == 4  # 1, 2, 4 (over), then 3 (over)
    table = compile_check.format_estimate(found, budget)
    print('\n' + table)
    assert '| offload_layer_inputs | 2 |' in table
    with pytest.raises(ValueError, match='--hbm_gib'):
        compile_check.estimate(config, topo, policies=['full'])


@pytest.mark.slow  # four compiles
def test_estimate_over_context_sizes_moves_devices_from_fsdp(tiny_llama_dir, chat_data):
    """--contexts: each context size takes its devices from fsdp (the device count fixed), one search per
    (context, policy), and the table gains a context column; a size that does not divide is one clear error."""
    config = tiny_config(tiny_llama_dir, chat_data, **{'peft.method': 'lora', 'data.max_length': 64})
    topo = compile_check.parse_topology('fsdp=4')
    found = compile_check.estimate(config, topo, policies=['full'], budget_bytes=1 << 40, max_rows=2,
                                   contexts=[1, 4])
    assert [(e['context'], e['policy'], e['rows'], e['capped']) for e in found] == [(1, 'full', 2, True),
                                                                                     (4, 'full', 2, True)]
    assert found[0]['report']['mesh']['fsdp'] == 4 and found[0]['report']['mesh']['context'] == 1
    assert found[1]['report']['mesh']['fsdp'] == 1 and found[1]['report']['mesh']['context'] == 4
    assert found[1]['report']['batch'][0] == 2  # 2 rows per data x fsdp shard: the one fsdp shard
    table = compile_check.format_estimate(found, 1 << 40)
    print('\n' + table)
    assert '| 4 (1) | full | 2+ |' in table and '| 1 (4) | full | 2+ |' in table
    with pytest.raises(ConfigError, match='--contexts: 3 does not divide the fsdp x context devices'):
        compile_check.estimate(config, topo, policies=['full'], budget_bytes=1 << 40, contexts=[3])


def test_collective_bytes_of_hlo_text():
    """Each collective's larger side (an all-gather's result, a reduce-scatter's operand), async starts once (the
    tuple's last shape: the result), tuples summed, TPU layouts and sub-byte types read."""
    hlo = '''  %param.1 = bf16[4,8,128]{2,1,0} parameter(0)
  %all_to_all.3 = bf16[4,8,128]{2,1,0:T(8,128)(2,1)S(1)} all-to-all(%param.1), channel_id=1, dimensions={0}
  %copy-done = bf16[4,8,128]{2,1,0} copy-done(%cs)
  %all-gather.4 = bf16[16,8,128]{2,1,0:T(8,128)(2,1)S(1)} all-gather(%copy-done), channel_id=1, dimensions={0}
  %reduce_scatter.7 = bf16[4,8,128]{2,1,0:T(8,128)(2,1)S(1)} reduce-scatter(%all-gather.4), channel_id=1
  %ags = (f32[2,4]{1,0}, f32[8,4]{1,0}) all-gather-start(%p2), dimensions={0}
  %agd = f32[8,4]{1,0} all-gather-done(%ags)
  ROOT %ar = (f32[10]{0}, s4[6]{0}) all-reduce(%a, %b), to_apply=%add
'''
    assert compile_check.collective_bytes(hlo) == {
        'all-to-all': {'count': 1, 'bytes': 4 * 8 * 128 * 2},
        'all-gather': {'count': 2, 'bytes': 16 * 8 * 128 * 2 + 8 * 4 * 4},
        'reduce-scatter': {'count': 1, 'bytes': 16 * 8 * 128 * 2},
        'all-reduce': {'count': 1, 'bytes': 10 * 4 + 3}}
