"""Export to transformers / peft and import from peft, checked against torch, transformers and peft themselves.

"Fine-tuning" is simulated: the adapters (and a classifier's head) get random non-zero values, so a dropped,
transposed or mis-scaled tensor changes the logits far beyond the float32 tolerance (1e-4).
"""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from ftjax import export, load_pretrained
from ftjax.models import LoraSpec, adapters, build_model, convert
from ftjax.peft import lora
from tests import tiny
from tests.tiny import REPO, tiny_config
from tests.tiny_gguf import write_tiny_gguf

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
peft = pytest.importorskip('peft')

TOL = 1e-4
ATTN_MLP = (r'(q|k|v|o)_proj$', r'(gate|up|down)_proj$')


def finetune(pre, spec, seed=0):
    """`pre` with adapters whose A, B (and DoRA magnitudes) are random and non-zero; a classifier's head moves too."""
    pre = lora.add_lora(pre, spec, jax.random.key(seed))
    rng = np.random.RandomState(seed)
    flat = traverse_util.flatten_dict(jax.device_get(pre.params))
    for path, v in flat.items():
        v = np.asarray(v)
        if path[-1] == 'lora_b':
            flat[path] = rng.normal(0, 0.05, v.shape).astype(v.dtype)
        elif path[-1] == 'lora_magnitude':
            flat[path] = (v * (1 + 0.1 * rng.normal(size=v.shape))).astype(v.dtype)
        elif path[0] in ('pooler', 'classifier') and path[-1] != 'lora_a':
            flat[path] = (v + rng.normal(0, 0.05, v.shape)).astype(v.dtype)
    return dataclasses.replace(pre, params=traverse_util.unflatten_dict(flat))


def merged_model(pre):
    """(model, params) of ftjax's merged model: adapters folded into the kernels, no adapter leaves."""
    cfg = dataclasses.replace(pre.config, lora=None)
    return build_model(cfg), adapters.merge(pre.params, pre.config.lora)


def decoder_ids(cfg):
    return np.random.RandomState(3).randint(0, cfg.vocab_size, (2, 11))


def encoder_inputs(cfg):
    ids = np.random.RandomState(4).randint(4, cfg.vocab_size, (3, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    ids[1, 6:] = cfg.pad_token_id
    return ids, mask


def ftjax_out(model, params, cfg, mask=None):
    if cfg.family == 'llama':
        return np.asarray(model.apply({'params': params}, decoder_ids(cfg)))
    return np.asarray(model.apply({'params': params}, encoder_inputs(cfg)[0], mask))


def torch_out(model, cfg):
    with torch.no_grad():
        if cfg.family == 'llama':
            return model(torch.tensor(decoder_ids(cfg))).logits.numpy()
        ids, mask = encoder_inputs(cfg)
        out = model(torch.tensor(ids), attention_mask=torch.tensor(mask))
        return (out.logits if cfg.num_labels else out.last_hidden_state).numpy()


def hf_class(cfg):
    if cfg.family == 'llama':
        return transformers.AutoModelForCausalLM
    return transformers.AutoModelForSequenceClassification if cfg.num_labels else transformers.AutoModel


def max_delta(ours, theirs, cfg, label):
    assert ours.shape == theirs.shape
    diff = np.abs(ours - theirs)
    if cfg.family == 'bert' and not cfg.num_labels:
        diff = diff[encoder_inputs(cfg)[1].astype(bool)]  # padded positions are undefined
    print(f'{label}: max|delta| = {diff.max():.2e}')
    return diff.max()


MODELS = {  # name -> (checkpoint builder, load_pretrained kwargs)
    'llama-tied': (lambda d: tiny.make_llama_checkpoint(d), {}),
    'llama-untied': (lambda d: tiny.make_llama_checkpoint(d, tie_word_embeddings=False), {}),
    'qwen2': (lambda d: tiny.make_llama_checkpoint(d, arch='qwen2'), {}),
    'bert-cls': (lambda d: tiny.make_bert_checkpoint(d, num_labels=2), {'num_labels': 2}),
    'roberta-cls': (lambda d: tiny.make_bert_checkpoint(d, arch='roberta', num_labels=2), {'num_labels': 2}),
    'bert-encoder': (lambda d: tiny.make_bert_checkpoint(d), {}),
}


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            made[name] = MODELS[name][0](str(tmp_path_factory.mktemp(name)))
        return made[name], MODELS[name][1]
    return get


CASES = [  # (model, LoraSpec)
    ('llama-tied', LoraSpec(rank=4, alpha=8.0, targets=ATTN_MLP)),
    ('llama-tied', LoraSpec(rank=4, alpha=8.0, targets=(r'(q|v)_proj$',), rslora=True)),
    ('llama-tied', LoraSpec(rank=4, alpha=8.0, targets=ATTN_MLP, dora=True)),
    ('llama-untied', LoraSpec(rank=2, alpha=4.0, targets=(r'(k|o)_proj$', r'down_proj$', r'lm_head$'), dora=True,
                              rslora=True)),
    ('qwen2', LoraSpec(rank=4, alpha=16.0, targets=ATTN_MLP)),
    ('bert-cls', LoraSpec(rank=4, alpha=8.0, targets=ATTN_MLP)),
    ('bert-cls', LoraSpec(rank=4, alpha=8.0, targets=(r'(q|v)_proj$', r'pooler$'), dora=True)),
    ('roberta-cls', LoraSpec(rank=4, alpha=8.0, targets=(r'(q|v)_proj$', r'(up|down)_proj$'), rslora=True)),
    ('bert-encoder', LoraSpec(rank=4, alpha=8.0, targets=(r'(o|down)_proj$',))),
]
CASE_IDS = ['llama-lora', 'llama-rslora-qv', 'llama-dora', 'untied-dora-rslora-lmhead', 'qwen2-lora',
            'bert-cls-lora', 'bert-cls-dora-pooler', 'roberta-cls-rslora', 'bert-encoder-lora']


def cases(fast):
    """CASES for parametrize, those not named in `fast` marked slow (the fast lane: a decoder and a classifier)."""
    return [pytest.param(*case, id=i, marks=() if i in fast else pytest.mark.slow) for case, i in zip(CASES, CASE_IDS)]


@pytest.mark.parametrize('name,spec', cases({'llama-dora', 'bert-cls-lora'}))
def test_export_hf_matches_transformers(checkpoint, tmp_path, name, spec):
    path, kw = checkpoint(name)
    pre = finetune(load_pretrained(path, **kw), spec)
    out = export.export_hf(pre, str(tmp_path / 'hf'))
    cfg = pre.config
    model, params = merged_model(pre)
    ours = ftjax_out(model, params, cfg, encoder_inputs(cfg)[1] if cfg.family == 'bert' else None)
    ref = hf_class(cfg).from_pretrained(out, dtype=torch.float32).eval()
    assert max_delta(ours, torch_out(ref, cfg), cfg, f'hf {name} {spec}') < TOL
    base = hf_class(cfg).from_pretrained(path, dtype=torch.float32).eval()
    assert np.abs(ours - torch_out(base, cfg)).max() > 100 * TOL  # the fine-tuning shows
    with open(os.path.join(out, 'config.json')) as f:
        config = json.load(f)
    assert config['architectures'] == [convert.architecture(pre.config, pre.hf_config)] and config['dtype'] == 'float32'
    assert transformers.AutoTokenizer.from_pretrained(out).get_vocab() == pre.tokenizer.get_vocab()
    if cfg.family == 'llama':
        assert config['tie_word_embeddings'] == cfg.tie_embeddings
        assert os.path.exists(os.path.join(out, 'generation_config.json'))
    if getattr(cfg, 'num_labels', None):
        assert ref.config.num_labels == cfg.num_labels


@pytest.mark.parametrize('name,spec', cases({'llama-lora', 'bert-cls-dora-pooler'}))
def test_export_peft_matches_peft(checkpoint, tmp_path, name, spec):
    path, kw = checkpoint(name)
    pre = finetune(load_pretrained(path, **kw), spec)
    out = export.export_peft(pre, str(tmp_path / 'adapter'))
    cfg = pre.config
    ours = ftjax_out(pre.model, pre.params, cfg, encoder_inputs(cfg)[1] if cfg.family == 'bert' else None)
    base = hf_class(cfg).from_pretrained(path, dtype=torch.float32).eval()
    theirs_base = torch_out(base, cfg)
    ref = peft.PeftModel.from_pretrained(base, out).eval()
    assert max_delta(ours, torch_out(ref, cfg), cfg, f'peft {name} {spec}') < TOL
    assert np.abs(ours - theirs_base).max() > 100 * TOL
    loaded = ref.peft_config['default']
    assert (loaded.r, loaded.lora_alpha, loaded.use_rslora, loaded.use_dora) == \
        (spec.rank, spec.alpha, spec.rslora, spec.dora)
    n_adapted = sum('lora_A' in n for n, _ in ref.named_parameters())  # what peft actually wrapped
    n_ours = sum(np.prod(v.shape[:1]) if path[0] == 'layers' else 1 for path, v in
                 traverse_util.flatten_dict(pre.params).items() if path[-1] == 'lora_a' and path[0] != 'pooler')
    assert n_adapted == n_ours


def test_peft_key_names_and_shapes(checkpoint, tmp_path):
    path, _ = checkpoint('llama-tied')
    pre = finetune(load_pretrained(path), LoraSpec(rank=4, alpha=8.0, targets=ATTN_MLP, dora=True))
    out = export.export_peft(pre, str(tmp_path / 'adapter'))
    tensors = load_file(os.path.join(out, 'adapter_model.safetensors'))
    q = pre.params['layers']['q_proj']
    a = tensors['base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight']
    b = tensors['base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight']
    m = tensors['base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector']
    np.testing.assert_array_equal(a, np.asarray(q['lora_a'][1]).T)  # [r, in]
    np.testing.assert_array_equal(b, np.asarray(q['lora_b'][1]).T)  # [out, r]
    np.testing.assert_array_equal(m, np.asarray(q['lora_magnitude'][1]))
    assert len(tensors) == 2 * 7 * 3
    with open(os.path.join(out, 'adapter_config.json')) as f:
        config = json.load(f)
    assert config['target_modules'] == sorted(['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj',
                                               'down_proj'])
    assert (config['peft_type'], config['task_type'], config['bias']) == ('LORA', 'CAUSAL_LM', 'none')


def test_target_modules_select_exactly_the_adapted_modules():
    everything = [f'bert.encoder.layer.{i}.{m}' for i in range(2) for m in (
        'attention.self.query', 'attention.self.value', 'attention.output.dense', 'intermediate.dense',
        'output.dense')]
    down_only = [n for n in everything if n.endswith('.output.dense') and 'attention' not in n]
    assert export.peft_target_modules(everything, down_only) == ['0.output.dense', '1.output.dense']
    assert export.peft_target_modules(everything, [n for n in everything if n.endswith('dense')]) == ['dense']


@pytest.mark.parametrize('use_dora,use_rslora', [(False, False), (True, False), (False, True)],
                         ids=['lora', 'dora', 'rslora'])
def test_import_adapter_made_by_peft(checkpoint, tmp_path, use_dora, use_rslora):
    path, _ = checkpoint('llama-untied')
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    conf = peft.LoraConfig(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj', 'down_proj'], use_dora=use_dora,
                           use_rslora=use_rslora, task_type='CAUSAL_LM')
    model = peft.get_peft_model(base, conf)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if 'lora_' in n:
                p.add_(0.1 * torch.randn(p.shape, generator=g))  # B (zeros at init) and A, m move
    model.save_pretrained(str(tmp_path / 'adapter'))
    pre = load_pretrained(path, adapter=str(tmp_path / 'adapter'))
    assert pre.config.lora.dora == use_dora and pre.config.lora.rslora == use_rslora
    assert adapters.adapted_paths(pre.params) == [('layers', 'down_proj'), ('layers', 'q_proj'), ('layers', 'v_proj')]
    ours = ftjax_out(pre.model, pre.params, pre.config)
    assert max_delta(ours, torch_out(model.eval(), pre.config), pre.config,
                     f'import dora={use_dora} rslora={use_rslora}') < TOL
    again = export.export_peft(pre, str(tmp_path / 'again'))  # round trip: the same tensors come back
    theirs = load_file(str(tmp_path / 'adapter' / 'adapter_model.safetensors'))
    mine = load_file(os.path.join(again, 'adapter_model.safetensors'))
    assert mine.keys() == theirs.keys()
    for k in theirs:
        np.testing.assert_array_equal(mine[k], theirs[k])


def test_import_classifier_adapter_with_head(checkpoint, tmp_path):
    path, kw = checkpoint('bert-cls')
    pre = finetune(load_pretrained(path, **kw), LoraSpec(rank=4, alpha=8.0, targets=ATTN_MLP))
    out = export.export_peft(pre, str(tmp_path / 'adapter'))
    back = load_pretrained(path, adapter=out, **kw)
    mask = encoder_inputs(pre.config)[1]
    assert np.abs(ftjax_out(back.model, back.params, back.config, mask) -
                  ftjax_out(pre.model, pre.params, pre.config, mask)).max() < 1e-5
    with pytest.raises(ValueError, match='num_labels'):
        load_pretrained(checkpoint('bert-encoder')[0], adapter=out)


def test_sharded_bfloat16_export(checkpoint, tmp_path):
    path, _ = checkpoint('llama-untied')
    pre = finetune(load_pretrained(path), LoraSpec(rank=4, alpha=8.0, targets=ATTN_MLP))
    out = export.export_hf(pre, str(tmp_path / 'f32'), max_shard_bytes=40_000)
    with open(os.path.join(out, 'model.safetensors.index.json')) as f:
        index = json.load(f)
    shards = sorted(set(index['weight_map'].values()))
    assert len(shards) > 2 and not os.path.exists(os.path.join(out, 'model.safetensors'))
    model, params = merged_model(pre)
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = ftjax_out(model, params, pre.config)
    assert max_delta(ours, torch_out(ref, pre.config), pre.config, 'hf sharded') < TOL
    out16 = export.export_hf(pre, str(tmp_path / 'bf16'), dtype='bfloat16')
    tensors = load_file(os.path.join(out16, 'model.safetensors'))
    assert {str(v.dtype) for v in tensors.values()} == {'bfloat16'}
    ref16 = transformers.AutoModelForCausalLM.from_pretrained(out16)
    assert ref16.dtype == torch.bfloat16


def test_gguf_model_exports_as_hf_directory(tiny_llama_dir, tmp_path):
    (tmp_path / 'g').mkdir()
    gguf_path = write_tiny_gguf(tiny_llama_dir, str(tmp_path / 'g' / 'tiny.gguf'))
    pre = finetune(load_pretrained(gguf_path), LoraSpec(rank=4, alpha=8.0, targets=ATTN_MLP))
    out = export.export_hf(pre, str(tmp_path / 'hf'))
    model, params = merged_model(pre)
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert max_delta(ftjax_out(model, params, pre.config), torch_out(ref, pre.config), pre.config, 'gguf->hf') < TOL
    tok = transformers.AutoTokenizer.from_pretrained(out)
    msgs = [{'role': 'user', 'content': 'What is the capital of France?'}]
    assert tok.chat_template == tiny.CHATML_TEMPLATE
    assert tok.apply_chat_template(msgs, tokenize=False) == pre.tokenizer.apply_chat_template(msgs, tokenize=False)
    with open(os.path.join(out, 'generation_config.json')) as f:
        assert json.load(f)['eos_token_id'] == pre.tokenizer.eos_token_id


# --- refusals and bad input --------------------------------------------------------------------------------


def test_refuses_mean_pooling_and_non_empty_out(checkpoint, tmp_path):
    pre = load_pretrained(checkpoint('bert-encoder')[0], num_labels=2, pooling='mean')
    with pytest.raises(ValueError, match="pooling='cls'"):
        export.export_hf(pre, str(tmp_path / 'x'))
    pre = load_pretrained(checkpoint('llama-tied')[0])
    (tmp_path / 'used').mkdir()
    (tmp_path / 'used' / 'model.safetensors').write_text('old')
    with pytest.raises(FileExistsError, match='not empty'):
        export.export_hf(pre, str(tmp_path / 'used'))
    with pytest.raises(ValueError, match='format=hf'):
        export.export_peft(pre, str(tmp_path / 'y'))


def test_refuses_peft_format_for_full_run(checkpoint, tmp_path, monkeypatch):
    import ftjax.build
    pre = load_pretrained(checkpoint('llama-tied')[0])
    pre.method = 'full'
    monkeypatch.setattr(ftjax.build, 'restore_for_export', lambda workdir, step=None: pre)
    with pytest.raises(ValueError, match=r"--format=peft.*peft.method='full'.*--format=hf"):
        export.export(str(tmp_path), str(tmp_path / 'out'), format='peft')
    assert not (tmp_path / 'out').exists()


def test_export_of_a_restored_lora_run(checkpoint, tmp_path, monkeypatch):
    """`export()` (what the CLI runs) on a LoRA run; extra trained norms cannot travel in an adapter."""
    import ftjax.build
    pre = finetune(load_pretrained(checkpoint('llama-tied')[0]), LoraSpec(rank=4, alpha=8.0, targets=ATTN_MLP))
    pre.method = 'lora'
    monkeypatch.setattr(ftjax.build, 'restore_for_export', lambda workdir, step=None: pre)
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'config.json').write_text(json.dumps({'peft': {'method': 'lora', 'trainable': [], 'norms': False,
                                                          'biases': False}}))
    out = export.export(str(run), str(tmp_path / 'adapter'), format='peft')
    assert sorted(os.listdir(out)) == ['adapter_config.json', 'adapter_model.safetensors']
    out = export.export(str(run), str(tmp_path / 'hf'), format='hf', dtype='bfloat16')
    with open(os.path.join(out, 'config.json')) as f:
        assert json.load(f)['dtype'] == 'bfloat16'
    (run / 'config.json').write_text(json.dumps({'peft': {'method': 'lora', 'trainable': [], 'norms': True,
                                                          'biases': False}}))
    with pytest.raises(ValueError, match=r'peft\.norms.*--format=hf'):
        export.export(str(run), str(tmp_path / 'adapter2'), format='peft')


def test_cli_refuses_workdir_without_checkpoint(tmp_path):
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'config.json').write_text(json.dumps(
        {'train': {'keep_checkpoints': 2, 'keep_best_by': None}, 'peft': {'method': 'lora'}}))
    proc = subprocess.run([sys.executable, '-m', 'ftjax', 'export', f'--workdir={tmp_path / "run"}',
                           f'--out={tmp_path / "out"}', '--format=hf'], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)
    assert proc.returncode != 0
    assert 'no complete checkpoint' in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / 'out').exists()


def _adapter(checkpoint, tmp_path):
    path, _ = checkpoint('llama-tied')
    pre = finetune(load_pretrained(path), LoraSpec(rank=4, alpha=8.0, targets=(r'(q|v)_proj$',)))
    return path, export.export_peft(pre, str(tmp_path / 'adapter'))


def test_import_refuses_other_peft_type(checkpoint, tmp_path):
    path, out = _adapter(checkpoint, tmp_path)
    cfg_file = os.path.join(out, 'adapter_config.json')
    with open(cfg_file) as f:
        config = json.load(f)
    with open(cfg_file, 'w') as f:
        json.dump(dict(config, peft_type='IA3'), f)
    with pytest.raises(ValueError, match="peft_type 'IA3' is not supported"):
        load_pretrained(path, adapter=out)
    with open(cfg_file, 'w') as f:
        json.dump(dict(config, rank_pattern={'q_proj': 8}), f)
    with pytest.raises(ValueError, match='rank_pattern'):
        load_pretrained(path, adapter=out)


def test_import_names_missing_tensor(checkpoint, tmp_path):
    path, out = _adapter(checkpoint, tmp_path)
    f = os.path.join(out, 'adapter_model.safetensors')
    tensors = load_file(f)
    del tensors['base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight']
    save_file(tensors, f)
    with pytest.raises(ValueError, match=r"missing tensor 'base_model\.model\.model\.layers\.1\.self_attn\.v_proj"
                                         r"\.lora_B\.weight'"):
        load_pretrained(path, adapter=out)


def test_import_refuses_other_base_model(checkpoint, tmp_path):
    _, out = _adapter(checkpoint, tmp_path)
    other = tiny.make_llama_checkpoint(str(tmp_path / 'wide'), hidden_size=96, num_attention_heads=4)
    with pytest.raises(ValueError, match=r'lora_A\.weight.*has shape \(4, 64\).*expects \(4, 96\).*another base'):
        load_pretrained(other, adapter=out)
    with pytest.raises(ValueError, match='another base model'):
        load_pretrained(checkpoint('bert-encoder')[0], adapter=out)


# --- the command line on runs trained by ftjax.loop: build.restore_for_export -> export -> transformers / peft ----

CLI_ENV = tiny.subprocess_env(HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', TRANSFORMERS_OFFLINE='1')
SENTENCES = [('great movie, loved it', 1), ('terrible plot, hated it', 0), ('a positive review', 1),
             ('a negative review', 0), ('loved the quick brown fox', 1), ('hated the lazy dog', 0)]


def run_cli(*args):
    proc = subprocess.run([sys.executable, '-m', 'ftjax', 'export', *args], cwd=REPO, env=CLI_ENV,
                          capture_output=True, text=True, timeout=300)
    print(f'ftjax export {" ".join(args)}: exit {proc.returncode}')
    return proc


def train(config, workdir):
    from ftjax.loop import train_and_evaluate
    assert train_and_evaluate(config, workdir)['step'] == config.train.steps
    return workdir


@pytest.fixture(scope='module')
def lora_run(tmp_path_factory, tiny_llama_dir, chat_data):
    """6 LoRA steps (tensor parallel over the 8 test devices), checkpoints at steps 3 and 6."""
    return train(tiny_config(tiny_llama_dir, chat_data), str(tmp_path_factory.mktemp('lora_run') / 'run'))


def restored(workdir, step=None):
    """(model, params) of ftjax's own fine-tuned model, adapters merged, as the export restores it."""
    from ftjax.build import restore_for_export
    pre = restore_for_export(workdir, step)
    return (merged_model(pre) if pre.config.lora is not None else (pre.model, pre.params)), pre


@pytest.mark.slow
def test_cli_hf_export_of_a_trained_lora_run_at_an_older_step(lora_run, tiny_llama_dir, tmp_path):
    assert sorted(os.listdir(os.path.join(lora_run, 'checkpoints'))) == ['3', '6']
    out = str(tmp_path / 'hf')
    proc = run_cli(f'--workdir={lora_run}', f'--out={out}', '--format=hf', '--step=3')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == out
    for f in ('config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json',
              'generation_config.json'):
        assert os.path.exists(os.path.join(out, f)), f
    (model3, params3), pre = restored(lora_run, step=3)
    cfg = pre.config
    ours3 = ftjax_out(model3, params3, cfg)
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert max_delta(ours3, torch_out(ref, cfg), cfg, 'cli hf step 3') < TOL
    (model6, params6), _ = restored(lora_run)
    ours6 = ftjax_out(model6, params6, cfg)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    print(f'max|logits step 6 - step 3| = {np.abs(ours6 - ours3).max():.2e}, '
          f'max|step 3 - base| = {np.abs(ours3 - torch_out(base, cfg)).max():.2e}')
    assert np.abs(ours6 - ours3).max() > 100 * TOL  # --step picked the older checkpoint, not the latest
    assert np.abs(ours3 - torch_out(base, cfg)).max() > 100 * TOL  # and the training shows in it


@pytest.mark.slow
def test_export_of_a_trained_lora_run_hf_and_peft(lora_run, tiny_llama_dir, tmp_path):
    """What the CLI runs (`export.export`), latest checkpoint: merged in transformers, adapter in peft."""
    (merged, merged_params), pre = restored(lora_run)
    cfg = pre.config
    hf = export.export(lora_run, str(tmp_path / 'hf'), format='hf')
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    assert max_delta(ftjax_out(merged, merged_params, cfg), torch_out(ref, cfg), cfg, 'run hf') < TOL
    adapter = export.export(lora_run, str(tmp_path / 'adapter'), format='peft')
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    theirs = torch_out(peft.PeftModel.from_pretrained(base, adapter).eval(), cfg)
    assert max_delta(ftjax_out(pre.model, pre.params, cfg), theirs, cfg, 'run peft') < TOL  # unmerged


@pytest.mark.slow
def test_cli_refusals_name_the_problem_and_the_fix(lora_run, tiny_llama_dir, chat_data, tmp_path):
    import shutil
    empty = tmp_path / 'empty'
    empty.mkdir()
    proc = run_cli(f'--workdir={empty}', f'--out={tmp_path / "o1"}')
    assert proc.returncode != 0 and 'no config.json' in proc.stderr and 'ftjax train --workdir' in proc.stderr, \
        proc.stderr[-2000:]

    broken = str(tmp_path / 'broken')
    shutil.copytree(lora_run, broken)
    os.remove(os.path.join(broken, 'checkpoints', '6', 'commit_success.txt'))  # as if the save never finished
    proc = run_cli(f'--workdir={broken}', f'--out={tmp_path / "o2"}', '--step=6')
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert "no complete checkpoint for --step=6" in proc.stderr and 'complete steps: [3]' in proc.stderr
    assert 'step 6: missing 6/commit_success.txt' in proc.stderr, proc.stderr[-2000:]
    shutil.rmtree(os.path.join(broken, 'checkpoints', '3', 'params'))
    proc = run_cli(f'--workdir={broken}', f'--out={tmp_path / "o3"}')
    assert proc.returncode != 0 and 'no complete checkpoint under' in proc.stderr, proc.stderr[-2000:]
    assert 'step 3: missing 3/params/commit_success.txt' in proc.stderr
    assert 'rerun the run\'s `python -m ftjax train` command' in proc.stderr
    assert not any(os.path.exists(tmp_path / o) for o in ('o1', 'o2', 'o3'))

    full = train(tiny_config(tiny_llama_dir, chat_data, **{'peft.method': 'full', 'train.steps': 2,
                                                           'optim.learning_rate': 1e-3}), str(tmp_path / 'full'))
    proc = run_cli(f'--workdir={full}', f'--out={tmp_path / "o4"}', '--format=peft')
    assert proc.returncode != 0 and not os.path.exists(tmp_path / 'o4')
    assert "peft.method='full' run" in proc.stderr and 'Export it with --format=hf' in proc.stderr, \
        proc.stderr[-2000:]
    (model, params), pre = restored(full)  # the full run's merged export is the model itself
    hf = export.export(full, str(tmp_path / 'full_hf'), format='hf')
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    assert max_delta(ftjax_out(model, params, pre.config), torch_out(ref, pre.config), pre.config, 'full') < TOL


@pytest.mark.slow
def test_export_skips_an_incomplete_latest_checkpoint(lora_run, tmp_path):
    import shutil
    broken = str(tmp_path / 'broken')
    shutil.copytree(lora_run, broken)
    os.remove(os.path.join(broken, 'checkpoints', '6', 'meta', 'commit_success.txt'))
    from ftjax.build import restore_for_export
    from ftjax.checkpoint import step_status
    assert step_status(broken) == {3: None, 6: 'missing 6/meta/commit_success.txt'}
    got = restore_for_export(broken).params
    want = restore_for_export(lora_run, step=3).params
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    before = sorted(os.listdir(os.path.join(broken, 'checkpoints')))
    restore_for_export(broken)
    assert sorted(os.listdir(os.path.join(broken, 'checkpoints'))) == before  # reads only: nothing cleaned up


@pytest.mark.slow
def test_cli_hf_export_of_a_bert_classifier_run(tiny_bert_dir, chat_data, tmp_path):
    data = tmp_path / 'data'
    data.mkdir()
    for name, rows in (('train.tsv', SENTENCES * 4), ('dev.tsv', SENTENCES)):
        (data / name).write_text('label\tsentence\n' + ''.join(f'{y}\t{s}\n' for s, y in rows))
    config = tiny_config(tiny_bert_dir, chat_data, **{
        'data.path': str(data / 'train.tsv'), 'data.eval_path': str(data / 'dev.tsv'),
        'data.format': 'classification', 'data.fields.text': 'sentence', 'data.max_length': 16,
        'data.packing': False, 'model.num_labels': 2, 'model.pooling': 'cls', 'train.steps': 2,
        'train.eval_every': 2, 'train.checkpoint_every': 2})
    run = train(config, str(tmp_path / 'run'))
    out = str(tmp_path / 'hf')
    proc = run_cli(f'--workdir={run}', f'--out={out}', '--format=hf')
    assert proc.returncode == 0, proc.stderr[-3000:]
    (model, params), pre = restored(run)
    cfg = pre.config
    ours = ftjax_out(model, params, cfg, encoder_inputs(cfg)[1])
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert ref.config.num_labels == 2
    assert max_delta(ours, torch_out(ref, cfg), cfg, 'cli hf bert classifier') < TOL
    adapter = export.export(run, str(tmp_path / 'adapter'), format='peft')  # head travels as modules_to_save
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2,
                                                                           dtype=torch.float32).eval()
    theirs = torch_out(peft.PeftModel.from_pretrained(base, adapter).eval(), cfg)
    assert max_delta(ftjax_out(pre.model, pre.params, cfg, encoder_inputs(cfg)[1]), theirs, cfg,
                     'bert classifier peft') < TOL
