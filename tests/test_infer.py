"""The inference engine (ftjax/infer/): per-token log-probs equal the train step's with LoRA on (greedy and
sampled), the `params` it is handed are the ones used, n samples per prompt, stop strings and callables, top-k
and top-p, a sharded mesh, and the growing KV cache against a no-cache loop. Parity with transformers and the
lm-eval `hf` backend: tests/test_generate.py, tests/test_harness.py, tests/test_families.py."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax.infer import Sampler, generate, generate_text, sampler as sampler_lib, sampling, unrolled
from ftjax.infer.prompts import bucket, left_pad
from ftjax.infer.sampler import cache_length
from ftjax.models import load_pretrained
from ftjax.models.adapters import LoraSpec
from ftjax.models.heads import lm_head_kernel
from ftjax.objectives.logprobs import token_logps
from ftjax.peft.lora import add_lora
from ftjax.sharding import make_mesh
from tests import tiny

NEW = 12


@pytest.fixture(scope='module')
def varied(tmp_path_factory):
    """A tiny Llama whose greedy continuations vary (initializer_range=0.2)."""
    return load_pretrained(tiny.make_llama_checkpoint(str(tmp_path_factory.mktemp('varied')), initializer_range=0.2))


@pytest.fixture(scope='module')
def lora(varied):
    """`varied` with LoRA on every projection and non-zero B, so the adapters change the outputs."""
    pre = add_lora(varied, LoraSpec(rank=4, alpha=8.0), jax.random.key(0))

    def nonzero_b(tree, keys):  # B = 0.3 x N(0, 1), one key per adapter in tree order
        i = iter(range(len(keys)))
        return jax.tree_util.tree_map_with_path(
            lambda p, x: 0.3 * jax.random.normal(keys[next(i)], x.shape, x.dtype) if p[-1].key == 'lora_b' else x,
            tree)
    params = jax.jit(nonzero_b)(pre.params, jax.random.split(jax.random.key(1), 64))  # eagerly, every op compiles
    return dataclasses.replace(pre, params=params)


def _prompts(vocab, lengths, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(0, vocab, n).tolist() for n in lengths]


LOGP_LENGTH = 64  # every reference sequence right-padded to this (causal: the padding changes nothing before it)
_LOGP_FNS = {}


def _train_logps(pre, params, prompt, new):
    """log p of each new token as the train step computes it: token_logps on the model's hidden states, jitted
    like the step (one compile per model for every length; eagerly, each length compiled every op anew)."""
    seq = prompt + new
    assert len(seq) <= LOGP_LENGTH, len(seq)
    if id(pre.model) not in _LOGP_FNS:
        def logps_of(params, ids):  # ids [1, LOGP_LENGTH] -> [1, LOGP_LENGTH - 1]
            hidden = pre.model.apply({'params': params}, ids, return_hidden=True)  # [1, seq, embed]
            head = lm_head_kernel(params, pre.config)
            return token_logps(hidden[:, :-1], head, ids[:, 1:], softcap=pre.config.final_softcap)
        _LOGP_FNS[id(pre.model)] = pre.model, jax.jit(logps_of)  # the model kept: its id is not reused
    ids = np.zeros((1, LOGP_LENGTH), np.int32)
    ids[0, :len(seq)] = seq
    logps = _LOGP_FNS[id(pre.model)][1](params, ids)
    return np.asarray(logps[0, len(prompt) - 1:len(seq) - 1])


@pytest.mark.parametrize('temperature', [0.0, 1.0], ids=['greedy', 'sampled'])
def test_logprobs_equal_the_train_steps_with_lora(lora, temperature):
    prompts = _prompts(lora.config.vocab_size, [5, 19, 9])
    ids, logps = generate(lora, prompts, NEW, temperature, seed=3, eos_ids=[], logprobs=True)
    for prompt, new, lp in zip(prompts, ids, logps):
        assert len(new) == NEW and lp.dtype == np.float32 and lp.shape == (NEW,)
        np.testing.assert_allclose(lp, _train_logps(lora, lora.params, prompt, new), atol=1e-5)
    if temperature:  # sampled tokens: not all the argmax, so these are not just the greedy ones' log-probs
        assert any(max(lp) < -1e-3 for lp in logps) and ids != generate(lora, prompts, NEW, eos_ids=[])


def test_params_passed_are_the_ones_used(varied, lora):
    """LoRA with non-zero B changes the generation; `params=` overrides the model's own (base) parameters."""
    prompts = _prompts(varied.config.vocab_size, [7, 12], seed=1)
    base = generate(varied, prompts, NEW, eos_ids=[])
    adapted, logps = generate(lora, prompts, NEW, eos_ids=[], logprobs=True)
    assert adapted != base
    zero_b = jax.tree_util.tree_map_with_path(lambda p, x: jnp.zeros_like(x) if p[-1].key == 'lora_b' else x,
                                              lora.params)
    assert generate(lora, prompts, NEW, eos_ids=[], params=zero_b) == base  # the override, not lora.params
    engine = Sampler(dataclasses.replace(lora, params=zero_b), batch_size=2)
    out = engine.sample(prompts, NEW, eos_ids=[], logprobs=True, params=lora.params)
    assert out.tokens == adapted
    np.testing.assert_allclose(np.stack(out.logprobs), np.stack(logps), atol=1e-6)


def test_decoding_on_the_stacked_weights_equals_the_copies(lora):
    """copy_layers=False (the layers sliced inside the decode program, no per-layer copies: RL rollouts'
    `rollout.copy_layers`) samples the same tokens with the same log-probs, LoRA on, greedy and sampled. At 4
    rows the copies hold [out, in] kernels (`unrolled.transposed`), so their matmuls sum in another order: the
    log-probs agree to float32 rounding (measured: 2.4e-6), within the train step's 1e-5."""
    prompts = _prompts(lora.config.vocab_size, [6, 15, 3], seed=4)
    for temperature in (0.0, 1.0):
        runs = [Sampler(lora, batch_size=4, copy_layers=copy).sample(
            prompts, NEW, temperature=temperature, seed=2, eos_ids=[], logprobs=True) for copy in (True, False)]
        assert runs[0].tokens == runs[1].tokens
        np.testing.assert_allclose(np.stack(runs[0].logprobs), np.stack(runs[1].logprobs), atol=1e-5)


def test_fused_projections_equal_the_separate_ones(varied):
    """Without LoRA the decode loop's per-layer copies join q|k|v and gate|up (`unrolled.fused`: 4 matmuls per
    layer instead of 7); the tokens and log-probs are those of the separate projections."""
    _, per_layer = unrolled.split(varied.params, varied.config)
    assert {'qkv_proj', 'gate_up_proj'} <= set(per_layer[0]) and 'q_proj' not in per_layer[0]
    assert per_layer[0]['qkv_proj']['kernel'].shape == (varied.config.hidden_size, varied.config.head_dim * (
        varied.config.num_heads + 2 * varied.config.num_kv_heads))
    prompts = _prompts(varied.config.vocab_size, [6, 15, 3], seed=4)
    runs = []
    for fuse in (True, False):
        engine = Sampler(varied, batch_size=4)
        engine.fuse = fuse
        runs.append(engine.sample(prompts, NEW, temperature=1.0, seed=2, eos_ids=[], logprobs=True))
    assert runs[0].tokens == runs[1].tokens
    np.testing.assert_allclose(np.stack(runs[0].logprobs), np.stack(runs[1].logprobs), atol=1e-6)


def test_transposed_kernels_at_more_than_one_row(lora):
    """From two rows on, the decode loop's per-layer copies hold plain 2-D kernels as [out, in] ('kernel_t');
    `untransposed` restores the tree exactly, and a batch of 4 (transposed) decodes each prompt's greedy tokens
    alone (one row: [in, out]), with the train step's log-probs, LoRA on."""
    _, per_layer = unrolled.split(lora.params, lora.config, out_major=True)
    _, plain = unrolled.split(lora.params, lora.config)
    q = per_layer[0]['q_proj']
    assert 'kernel' not in q and q['kernel_t'].shape[::-1] == (lora.config.hidden_size, q['kernel_t'].shape[0])
    assert 'lora_a' in q  # adapters as they are
    back = unrolled.untransposed(per_layer[0])
    assert jax.tree.structure(back) == jax.tree.structure(plain[0])
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(plain[0])))
    prompts = _prompts(lora.config.vocab_size, [6, 15, 3, 9], seed=6)
    batch = Sampler(lora, batch_size=4).sample(prompts, NEW, eos_ids=[], logprobs=True)
    for i, prompt in enumerate(prompts):
        alone = generate(lora, prompt, NEW, eos_ids=[], logprobs=True)
        assert batch.tokens[i] == alone[0]
        np.testing.assert_allclose(batch.logprobs[i], _train_logps(lora, lora.params, prompt, alone[0]), atol=1e-5)


def test_weights_placed_once(varied):
    """load_pretrained's parameters are host (numpy) arrays: the engine puts them on the device once and keeps the
    decode loop's per-layer copies, so a second `sample` call moves no weight (a host leaf handed to a jitted
    decode chunk is copied to the device at every chunk)."""
    assert any(isinstance(x, np.ndarray) for x in jax.tree.leaves(varied.params))
    prompts = _prompts(varied.config.vocab_size, [6, 15], seed=5)
    engine = Sampler(varied, batch_size=2, chunk=4)
    first = engine.sample(prompts, NEW, eos_ids=[])
    buffers = engine.buffers()
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves((engine.params, buffers)))
    again = engine.sample(prompts, NEW, eos_ids=[])
    assert again.tokens == first.tokens and engine.buffers() is buffers
    assert first.tokens == generate(varied, prompts, NEW, eos_ids=[])


def test_one_row_decode_copies_each_cache_at_most_once(varied, monkeypatch):
    """At one row the decode loop carries its KV caches without the row axis (`_decode_chunk`'s `carried`): XLA's
    CPU backend then copies each layer's k or v cache at most once per step in the compiled loop. With the row
    axis it fused each cache update twice and copied every cache four times per step (docs/performance.md)."""
    calls = []
    original = sampler_lib._decode_chunk

    def spy(*args, **kw):  # the shapes of the last call, for lowering it again
        calls.append((jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype) if isinstance(a, jax.Array)
                                   else a, args), kw))
        return original(*args, **kw)
    monkeypatch.setattr(sampler_lib, '_decode_chunk', spy)
    prompt = _prompts(varied.config.vocab_size, [40], seed=7)
    assert Sampler(varied, batch_size=1, chunk=4).sample(prompt, NEW, eos_ids=[]).tokens == generate(
        varied, prompt, NEW, eos_ids=[])
    args, kw = calls[-1]
    _, kv_heads, slots, head_dim = args[4][0]['k'].shape  # one layer's cache: [rows, kv_heads, slots, head_dim]
    shapes = (f'f32[1,{kv_heads},{slots},{head_dim}]', f'f32[{kv_heads},{slots},{head_dim}]')
    hlo = original.lower(*args, **kw).compile().as_text()
    copies = [line for line in hlo.splitlines() if ' copy(' in line and line.split('= ')[1].startswith(shapes)]
    caches = 2 * varied.config.num_layers
    assert len(copies) <= caches, (len(copies), caches)


def test_n_samples_seeds_and_filters(varied):
    prompts = _prompts(varied.config.vocab_size, [4, 10], seed=2)
    greedy = generate(varied, prompts, NEW, eos_ids=[])
    assert generate(varied, prompts, NEW, eos_ids=[], n=3) == [[g] * 3 for g in greedy]
    sampled = generate(varied, prompts, NEW, 1.0, eos_ids=[], n=3, seed=5)
    assert [len(s) for s in sampled] == [3, 3] and all(len({tuple(x) for x in s}) == 3 for s in sampled)
    assert generate(varied, prompts, NEW, 1.0, eos_ids=[], n=3, seed=5) == sampled  # a seed repeats
    assert generate(varied, prompts, NEW, 1.0, eos_ids=[], n=3, seed=6) != sampled
    assert generate(varied, prompts, NEW, 1.0, top_k=1, eos_ids=[]) == greedy  # top-1 is greedy
    assert generate(varied, prompts, NEW, 1.0, top_p=1e-6, eos_ids=[]) == greedy  # so is the top token's nucleus


def test_top_k_and_top_p_sample_only_their_sets():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.1, 0.06, 0.04]] * 4000))  # [rows, vocab]
    key = jax.random.key(0)
    top2 = np.asarray(sampling.sample_logits(logits, key, 1.0, 1.0, sampling.mode_of(1.0, 2, 1.0, 5)))
    assert set(top2.tolist()) == {0, 1}
    nucleus = np.asarray(sampling.sample_logits(logits, key, 1.0, 0.85, sampling.mode_of(1.0, 0, 0.85, 5)))
    assert set(nucleus.tolist()) == {0, 1, 2}  # 0.5 + 0.3 < 0.85: the third token is needed
    assert abs(np.mean(nucleus == 0) - 0.5 / 0.9) < 0.03  # renormalised over the nucleus
    free = np.asarray(sampling.sample_logits(logits, key, 1.0, 1.0, sampling.mode_of(1.0, 0, 1.0, 5)))
    assert set(free.tolist()) == {0, 1, 2, 3, 4}


def test_stop_strings_ids_and_callables(varied):
    tok = varied.tokenizer
    prompt = tok('hello world')['input_ids']
    free = generate(varied, prompt, NEW, eos_ids=[])
    text = tok.decode(free, skip_special_tokens=False)
    word = tok.decode(free[2:4], skip_special_tokens=False)  # appears after the 4th token at the latest
    assert word.strip() and word in text
    stopped = generate(varied, prompt, NEW, eos_ids=[], stop=[word], chunk=2)
    assert free[:len(stopped)] == stopped and len(stopped) <= 4 + 1  # checked every 2 tokens
    cut = generate_text(varied, 'hello world', max_new_tokens=NEW, eos_ids=[], stop=word)
    assert word not in cut and tok.decode(free, skip_special_tokens=True).startswith(cut)
    eos = free[5]
    assert generate(varied, prompt, NEW, eos_ids=[eos]) == free[:free.index(eos) + 1]  # the stop id is kept
    calls = []
    asked = generate(varied, [prompt, prompt[:3]], NEW, eos_ids=[], chunk=4,
                     stop=lambda i, ids: calls.append((i, len(ids))) or (i == 1 and len(ids) >= 5))
    assert len(asked[0]) == NEW and len(asked[1]) == 5 and (1, 1) in calls and (0, 5) in calls


@pytest.mark.slow  # the fast lane: the engine on a mesh in tests/test_harness.py (bucketed scores on any mesh)
@pytest.mark.parametrize('mesh', [{'data': 2, 'fsdp': 1, 'tensor': 4},
                                  {'data': 2, 'fsdp': 4, 'tensor': 1}])
def test_sharded_mesh_equals_one_device(lora, mesh):
    prompts = _prompts(lora.config.vocab_size, [3, 17, 40, 5, 9], seed=4)
    ids, logps = generate(lora, prompts, NEW, eos_ids=[], logprobs=True)
    engine = Sampler(lora, batch_size=2, mesh=make_mesh(mesh), chunk=4)
    assert engine.rows == (2 if mesh['fsdp'] == 1 else 8)  # rows split over data x fsdp
    out = engine.sample(prompts, NEW, eos_ids=[], logprobs=True)
    assert out.tokens == ids
    np.testing.assert_allclose(np.stack(out.logprobs), np.stack(logps), atol=1e-5)
    sampled = engine.sample(prompts, NEW, temperature=1.0, n=2, seed=1, eos_ids=[])
    assert len(sampled.tokens) == 10 and all(len(s) == NEW for s in sampled.tokens)


def test_growing_cache_equals_a_no_cache_loop(varied):
    """Decoding past several cache buckets (32 -> 48 -> 64 -> 96 slots) equals recomputing the whole sequence."""
    assert [cache_length(n, 90) for n in (20, 33, 49, 65, 90)] == [32, 48, 64, 90, 90]
    prompt = _prompts(varied.config.vocab_size, [9], seed=5)[0]
    ours = generate(varied, prompt, 70, eos_ids=[], chunk=8)
    forward = jax.jit(lambda ids: varied.model.apply({'params': varied.params}, ids))
    ids = list(prompt)
    for _ in range(70):
        logits = np.asarray(forward(np.array([ids + [0] * (79 - len(ids))])))  # right padding: causal, no effect
        ids.append(int(np.argmax(logits[0, len(ids) - 1])))
    assert ours == ids[len(prompt):]


def test_prompt_buckets_and_padding():
    assert [bucket(n) for n in (1, 32, 33, 49, 65, 97, 129)] == [32, 32, 48, 64, 96, 128, 192]
    tokens, pad = left_pad([[5, 6], [7]], 4, 3)
    assert tokens.tolist() == [[0, 0, 5, 6], [0, 0, 0, 7], [0, 0, 0, 0]] and pad.tolist() == [2, 3, 3]
