"""`ftjax.objectives.reference`: preference optimisation from an SFT model (issue 18), and the precomputed
reference's cache.

`model.adapter` (a PEFT adapter directory or a ftjax run's workdir) with `model.adapter_merge`: the SFT adapter is
folded into the frozen base and a fresh LoRA trains on top, so the adapters-off reference is the SFT model (base +
adapter) and DPO starts at log 2. `align.reference=precomputed` (full / partial fine-tuning): the reference
log-probs are computed at the first start and read from the cache at the next, keyed by model and data.
"""
import math
import os
import types

import jax
import numpy as np
import pytest

import ftjax
from ftjax import build as build_lib, data as data_lib, export, optim, peft
from ftjax import state as state_lib
from ftjax.config import default_config, override, validate
from ftjax.errors import ConfigError
from ftjax.loop import train_and_evaluate
from ftjax.models import load_pretrained
from ftjax.models.adapters import LORA_B, LoraSpec, map_adapted
from ftjax.objectives import preference, reference
from ftjax.train_step import make_train_step
from tests import tiny

LOG2 = math.log(2.0)
PAIRS = [{'prompt': f'Where does {name} live? Answer in one word.', 'chosen': f'{city}.',
          'rejected': f'{name} lives in {other}, I believe.'}
         for name, city, other in [('Alice', 'Paris', 'London'), ('Bob', 'Oslo', 'Rome'), ('Chen', 'Kyoto', 'Lima'),
                                   ('Dana', 'Lagos', 'Cairo'), ('Eli', 'Quito', 'Turin'), ('Fay', 'Pune', 'Seoul')]]


@pytest.fixture(scope='module')
def llama(tiny_llama_dir):
    return load_pretrained(tiny_llama_dir)


@pytest.fixture(scope='module')
def sft_adapter(tmp_path_factory, llama):
    """A PEFT LoRA adapter directory for the tiny Llama whose B is not zero (an 'SFT' model unlike the base)."""
    pre = peft.lora.add_lora(llama, LoraSpec(rank=4, alpha=8.0), jax.random.key(3))
    rng = np.random.RandomState(0)
    pre.params = map_adapted(pre.params, lambda m: dict(m, **{LORA_B: rng.normal(0, 0.05, m[LORA_B].shape).astype(
        np.float32)}))
    return export.export_peft(pre, str(tmp_path_factory.mktemp('sft_adapter')))


@pytest.fixture(scope='module')
def pairs_file(tmp_path_factory):
    return tiny.write_jsonl(tmp_path_factory.mktemp('pairs') / 'pairs.jsonl', PAIRS)


def make_config(model_dir, data_path, tmp_path, method='lora', **over):
    c = default_config()
    c.model.path, c.peft.method = model_dir, method
    c.data.path, c.data.format, c.data.max_length = str(data_path), 'preference', 96
    c.data.cache_dir = str(tmp_path / 'cache')
    c.optim.learning_rate, c.optim.schedule = 1e-2, 'constant'
    c.train.batch_size, c.train.loss_chunk = 4, 128
    c = override(c, over)
    validate(c)
    return c


def build(c):
    """(Pretrained, first train state, jitted train step) as the loop builds them."""
    pre, mask = build_lib.build_model_and_mask(c)
    trainable, _ = state_lib.partition(pre.params, mask)
    tx, schedule = optim.make_optimizer(c, trainable, c.train.steps)
    state = jax.jit(lambda p: state_lib.create_state(p, mask, tx, c.model.frozen_dtype))(pre.params)
    return pre, state, jax.jit(make_train_step(pre.model, c, tx, schedule))


def sums(pre, batch):
    return np.asarray(jax.jit(lambda p, b: preference.answer_logps(pre.model, p, b, None, 128)[0])(pre.params, batch))


@pytest.mark.slow
def test_dpo_from_a_merged_sft_adapter(llama, tiny_llama_dir, sft_adapter, pairs_file, tmp_path):
    """The adapters-off reference is the SFT model as peft runs it (x W + s (x A) B); step 0: log 2, rewards 0."""
    c = make_config(tiny_llama_dir, pairs_file, tmp_path, **{'model.adapter': sft_adapter, 'model.adapter_merge': True})
    s = preference.settings(c)
    assert s.reference == 'adapters_off'
    pre, state, step = build(c)
    assert pre.config.lora.rank == c.peft.lora.rank  # a fresh adapter of config.peft.lora, not the SFT one (rank 4)
    train, _ = build_lib.build_data(c, pre)
    batch = data_lib.take_rows(train, np.arange(4))
    ref = np.asarray(jax.jit(lambda f, b: preference.reference_logps(pre.model, s, f, b, 128))(state.frozen, batch))
    want = sums(ftjax.load_pretrained(tiny_llama_dir, adapter=sft_adapter), batch)
    diff, moved = float(np.abs(ref - want).max()), float(np.abs(want - sums(llama, batch)).max())
    print(f'merged-SFT reference vs base + SFT adapter: max |diff| {diff:.1e} (the adapter moves the sums by '
          f'{moved:.2f}; |sums| up to {float(np.abs(want).max()):.0f})')
    assert moved > 0.1  # the SFT adapter matters, so the check below tells the SFT model from the base
    assert diff <= 1e-5 * float(np.abs(want).max())  # W + s A B folded in float32: rounding only
    _, m = step(state, batch, jax.random.key(0))
    assert float(m['loss']) == pytest.approx(LOG2, abs=1e-7)
    assert float(m['rewards/chosen']) == 0.0 and float(m['rewards/rejected']) == 0.0


def test_adapter_options_are_checked(tiny_llama_dir, pairs_file, tmp_path):
    c = make_config(tiny_llama_dir, pairs_file, tmp_path, **{'model.adapter_merge': True})
    with pytest.raises(ConfigError, match='config.model.adapter is not set'):
        build_lib.load_start(c)
    c = make_config(tiny_llama_dir, pairs_file, tmp_path, **{'model.adapter': str(tmp_path / 'runs' / 'sft')})
    with pytest.raises(FileNotFoundError, match=r"config.model.adapter=.*does not exist.*experiments/quickstart.py"):
        build_lib.load_start(c)
    c = make_config(tiny_llama_dir, pairs_file, tmp_path,
                    **{'model.adapter': str(tmp_path), 'model.adapter_merge': True})
    with pytest.raises(ConfigError, match="quantize='gguf'"):  # the file's blocks cannot hold a merged adapter
        build_lib.load_start(override(c, {'model.quantize': 'gguf'}))
    run = types.SimpleNamespace(config=types.SimpleNamespace(lora=LoraSpec()), method='lora')
    with pytest.raises(ConfigError, match='adapter_merge.*--format=hf'):  # its adapter sits on base + SFT adapter
        export.check_peft_run(run, 'runs/dpo_sft', c)


@pytest.mark.slow
def test_dpo_from_an_sft_run_workdir(tiny_llama_dir, chat_data, pairs_file, tmp_path):
    """`model.adapter` = a ftjax LoRA run's workdir (no export): its fine-tuned model, merged, is the reference."""
    sft = str(tmp_path / 'sft')
    train_and_evaluate(tiny.tiny_config(tiny_llama_dir, chat_data, **{'train.steps': 2, 'eval.generate': 0,
                                                                      'peft.lora.rank': 4}), sft)
    c = make_config(tiny_llama_dir, pairs_file, tmp_path, **{'model.adapter': sft, 'model.adapter_merge': True})
    pre, state, step = build(c)
    train, _ = build_lib.build_data(c, pre)
    batch = data_lib.take_rows(train, np.arange(4))
    want = sums(build_lib.restore_for_export(sft), batch)  # the SFT run's fine-tuned model
    ref = np.asarray(jax.jit(lambda f, b: preference.reference_logps(pre.model, preference.settings(c), f, b, 128))(
        state.frozen, batch))
    print(f'merged SFT run vs the run restored: max |diff| {np.abs(ref - want).max():.1e}')
    assert np.abs(ref - want).max() <= 1e-5 * np.abs(want).max()
    assert float(step(state, batch, jax.random.key(0))[1]['loss']) == pytest.approx(LOG2, abs=1e-7)


def test_precomputed_reference_is_read_back_on_a_second_start(llama, tiny_llama_dir, tmp_path, sft_adapter,
                                                               pairs_file):
    """Full fine-tuning: the reference log-probs are computed at the first start and read at the second (no
    forward pass), keyed by the model and the data: another adapter or other rows compute them again."""
    c = make_config(tiny_llama_dir, pairs_file, tmp_path, 'full')
    assert preference.settings(c).reference == 'precomputed'
    pre, _ = build_lib.build_model_and_mask(c)
    first, _ = build_lib.build_data(c, pre)
    assert first.stats['reference_batches'] == 2 and len(first) == 6  # 6 pairs, batches of 4
    want = sums(pre, data_lib.take_rows(first, np.arange(6)))
    np.testing.assert_allclose(first.ref_logps, want, rtol=1e-6)
    again, _ = build_lib.build_data(c, pre)  # a restart: the same model and data
    assert again.stats['reference_batches'] == 0
    np.testing.assert_array_equal(again.ref_logps, first.ref_logps)
    cached = sorted(os.listdir(reference.cache_dir(c)))
    assert len(cached) == 1 and cached[0].endswith('.npy')
    with open(os.path.join(reference.cache_dir(c), cached[0]), 'wb') as f:
        f.write(b'\x93NUMPY damaged')  # a damaged cache file is computed again and replaced
    assert build_lib.build_data(c, pre)[0].stats['reference_batches'] == 2
    np.testing.assert_array_equal(build_lib.build_data(c, pre)[0].ref_logps, first.ref_logps)
    c2 = make_config(tiny_llama_dir, pairs_file, tmp_path, 'full', **{'model.adapter': sft_adapter})  # another start
    pre2, _ = build_lib.build_model_and_mask(c2)
    other, _ = build_lib.build_data(c2, pre2)
    assert other.stats['reference_batches'] == 2 and not np.allclose(other.ref_logps, first.ref_logps)
    fewer = make_config(tiny_llama_dir, tiny.write_jsonl(tmp_path / 'fewer.jsonl', PAIRS[:5]), tmp_path, 'full')
    assert build_lib.build_data(fewer, pre)[0].stats['reference_batches'] == 2  # other rows
    assert len(os.listdir(reference.cache_dir(c))) == 3
