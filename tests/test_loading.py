"""Every kind of model path a user can give (`model.path` / `--model`, `model.adapter` / `--adapter`) that cannot
load stops with ONE line of a `ftjax.errors.UserError` class naming the path (or the key) and the fix; a fault
of the path or of config.json is found before any weights are read. A few run through the command lines
(exit code 2, `ftjax: error: ...`, no traceback)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from ftjax import build
from ftjax.config import default_config
from ftjax.errors import ConfigError, MissingFileError, ModelError, UserError
from ftjax.models import loading
from ftjax.pretrained import load_pretrained
from tests import tiny
from tests.tiny import REPO
from tests.tiny_gguf import write_tiny_gguf


def _config_dir(root, name, config):
    """A directory holding only config.json: `config` (a dict) as JSON, or a str as the raw text."""
    d = os.path.join(root, name)
    os.makedirs(d)
    with open(os.path.join(d, 'config.json'), 'w') as f:
        f.write(config if isinstance(config, str) else json.dumps(config))
    return d


def _copy(src, root, name, drop=(), cut=None):
    """A copy of model directory `src` without the files in `drop`, with `cut` (a file name) cut in half."""
    d = shutil.copytree(src, os.path.join(root, name))
    for f in drop:
        os.remove(os.path.join(d, f))
    if cut:
        data = open(os.path.join(d, cut), 'rb').read()
        open(os.path.join(d, cut), 'wb').write(data[:len(data) // 2])
    return d


def _bytes(root, name, data):
    path = os.path.join(root, name)
    with open(path, 'wb') as f:
        f.write(data)
    return path


def _run_dir(root, name):
    """A ftjax run's workdir as a training run leaves it before its first checkpoint: config.json, checkpoints/."""
    d = os.path.join(root, name)
    os.makedirs(os.path.join(d, 'checkpoints'))
    with open(os.path.join(d, 'config.json'), 'w') as f:
        json.dump(default_config().to_dict(), f)
    return d


# name -> (make(root, llama_dir) -> the model.path value, the error class, words the one line must hold)
MODEL_PATHS = {
    'missing directory': (lambda r, m: f'{r}/nope', MissingFileError, ['nope', 'does not exist']),
    'missing .gguf': (lambda r, m: f'{r}/nope.gguf', MissingFileError, ['nope.gguf', 'does not exist']),
    'empty directory': (lambda r, m: os.makedirs(f'{r}/empty') or f'{r}/empty', MissingFileError,
                        ['model.path', 'empty', 'no config.json']),
    'config.json only': (lambda r, m: _copy(m, r, 'no_weights', drop=['model.safetensors']), MissingFileError,
                         ['model.path', 'no_weights', 'no *.safetensors']),
    'unsupported model_type': (lambda r, m: _config_dir(r, 'gpt2', {'model_type': 'gpt2'}), ModelError,
                               ['gpt2', "model_type 'gpt2'", 'Supported architectures']),
    'no model_type': (lambda r, m: _config_dir(r, 'nomt', {'hidden_size': 4}), ModelError, ['nomt', 'None']),
    'config.json not JSON': (lambda r, m: _config_dir(r, 'badjson', '{not json'), ModelError,
                             ['badjson/config.json', 'not valid JSON']),
    'config.json a list': (lambda r, m: _config_dir(r, 'listjson', '[1, 2]'), ModelError,
                           ['listjson', 'not a JSON object']),
    'config.json incomplete': (lambda r, m: _config_dir(r, 'incomplete', {'model_type': 'llama'}), ModelError,
                               ['incomplete', "'vocab_size'"]),
    'config.json rope incomplete': (lambda r, m: _config_dir(r, 'rope', dict(
        json.load(open(os.path.join(m, 'config.json'))), rope_scaling={'rope_type': 'llama3', 'factor': 8.0})),
        ModelError, ['rope', "rope_type 'llama3' lacks", 'low_freq_factor']),
    'truncated safetensors': (lambda r, m: _copy(m, r, 'cut', cut='model.safetensors'), ModelError,
                              ['cut/model.safetensors', 'truncated or corrupt']),
    'a file, not a model': (lambda r, m: os.path.join(m, 'config.json'), ModelError,
                            ['model.path', 'config.json', 'is a file']),
    'not a GGUF file': (lambda r, m: _bytes(r, 'text.gguf', b'hello, this is not a gguf file\n' * 4), ModelError,
                        ['text.gguf', 'not a valid GGUF']),
    'truncated GGUF': (lambda r, m: _bytes(r, 'cut.gguf', open(write_tiny_gguf(m, f'{r}/whole.gguf'), 'rb').read(
        )[:5000]), ModelError, ['cut.gguf', 'not a valid GGUF']),
    'GGUF of another architecture': (lambda r, m: write_tiny_gguf(m, f'{r}/falcon.gguf', arch='falcon'), ModelError,
                                     ['falcon.gguf', "architecture 'falcon' is not supported"]),
    'a directory named .gguf': (lambda r, m: os.makedirs(f'{r}/d.gguf') or f'{r}/d.gguf', MissingFileError,
                                ['d.gguf']),
    'hub name, offline': (lambda r, m: 'HuggingFaceTB/no-such-model-for-ftjax-tests', ModelError,
                          ['model.path', 'no-such-model-for-ftjax-tests', 'Hugging Face hub']),
    'hub name a/b/c': (lambda r, m: 'a/b/c', MissingFileError, ["'a/b/c'", 'does not exist']),
    'hub name with spaces': (lambda r, m: 'my org/my model', ModelError, ["'my org/my model'", 'hub name']),
    'hf:// URL': (lambda r, m: 'hf://org/model', ModelError, ["'hf://org/model'", 'URL']),
    'https URL': (lambda r, m: 'https://huggingface.co/org/model', ModelError, ['https://huggingface.co', 'URL']),
    'packaged:UNKNOWN': (lambda r, m: 'packaged:UNKNOWN', MissingFileError, ["'packaged:UNKNOWN'", 'packaged:smollm2']),
    'shared: data location': (lambda r, m: 'shared:gsm8k/train.jsonl', ModelError, ["'shared:gsm8k/train.jsonl'",
                                                                                   'data']),
    'empty string': (lambda r, m: '', ConfigError, ["model.path=''", '--config.model.path', '--model']),
    'None': (lambda r, m: None, ConfigError, ['model.path=None']),
    'a run workdir': (lambda r, m: _run_dir(r, 'run'), ModelError, ['run', 'training run', 'model.adapter']),
}


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp('paths'))


def one_line(exc_class, fn, *words):
    """fn() raises `exc_class` (a UserError) with one line holding every word of `words`."""
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert type(e.value) is exc_class, f'{type(e.value).__name__}: {msg}'
    assert '\n' not in msg, msg
    for w in words:
        assert w in msg, f'{w!r} not in: {msg}'
    return msg


@pytest.mark.parametrize('kind', MODEL_PATHS)
def test_a_model_path_that_cannot_load_is_one_line(kind, root, tiny_llama_dir, monkeypatch):
    make, exc_class, words = MODEL_PATHS[kind]
    path = make(root, tiny_llama_dir)
    if kind not in ('truncated safetensors', 'config.json only'):  # the rest: found before reading weights
        monkeypatch.setattr(loading, 'read_safetensors', lambda *a: pytest.fail('read the weights first'))
    one_line(exc_class, lambda: load_pretrained(path), *words)


def test_num_labels_on_a_decoder_names_the_key(tiny_llama_dir):
    one_line(ConfigError, lambda: load_pretrained(tiny_llama_dir, num_labels=2), 'config.model.num_labels=2',
             'decoder')


def _adapter(root, name, config=None, weights=None):
    d = os.path.join(root, name)
    os.makedirs(d)
    if config is not None:
        with open(os.path.join(d, 'adapter_config.json'), 'w') as f:
            f.write(config if isinstance(config, str) else json.dumps(config))
    if weights is not None:
        with open(os.path.join(d, 'adapter_model.safetensors'), 'wb') as f:
            f.write(weights)
    return d


LORA = {'peft_type': 'LORA', 'r': 4, 'lora_alpha': 8, 'target_modules': ['q_proj']}
ADAPTERS = {
    'missing': (lambda r: f'{r}/no_adapter', MissingFileError, ['model.adapter', 'no_adapter',
                                                                'adapter_config.json']),
    'a model directory': (None, MissingFileError, ['model.adapter', 'no adapter_config.json']),
    'no weights': (lambda r: _adapter(r, 'a_noweights', LORA), MissingFileError, ['adapter_model.safetensors']),
    'not LoRA': (lambda r: _adapter(r, 'a_prefix', {'peft_type': 'PREFIX_TUNING'}, b'x'), ModelError,
                 ["peft_type 'PREFIX_TUNING'"]),
    'config not JSON': (lambda r: _adapter(r, 'a_badjson', '{oops', b'x'), ModelError, ['a_badjson', 'not valid JSON']),
    'no rank': (lambda r: _adapter(r, 'a_norank', {'peft_type': 'LORA', 'lora_alpha': 8}, b'x'), ModelError,
                ['a_norank', 'r=None']),
    'corrupt weights': (lambda r: _adapter(r, 'a_corrupt', LORA, b'not safetensors'), ModelError,
                        ['a_corrupt/adapter_model.safetensors', 'cannot read']),
}


@pytest.mark.parametrize('kind', ADAPTERS)
def test_an_adapter_that_cannot_load_is_one_line(kind, root, tiny_llama_dir):
    make, exc_class, words = ADAPTERS[kind]
    adapter = make(root) if make else tiny_llama_dir
    one_line(exc_class, lambda: load_pretrained(tiny_llama_dir, adapter=adapter), *words)


def test_a_model_without_a_tokenizer_cannot_train(root, tiny_llama_dir):
    """The loader keeps a model without tokenizer files (weights alone are a valid library use); the run that
    would tokenize its data with it stops with one line naming model.path."""
    d = os.path.join(root, 'no_tokenizer')
    os.makedirs(d)
    for f in ('config.json', 'model.safetensors'):
        shutil.copy(os.path.join(tiny_llama_dir, f), d)
    assert load_pretrained(d).tokenizer is None
    c = default_config()
    c.model.path = d
    one_line(ModelError, lambda: build.load_start(c), f'config.model.path={d!r}', 'no usable tokenizer')


# --- through the command lines: exit code 2, one line, no traceback ----------------------------------------------

def run_cli(*args):
    """`python -m ftjax ARGS` in a fresh process on one CPU device, offline -> (exit code, stderr)."""
    env = tiny.subprocess_env(JAX_PLATFORMS='cpu', HF_HUB_OFFLINE='1')
    proc = subprocess.run([sys.executable, '-m', 'ftjax', *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    return proc.returncode, proc.stderr


def error_line(rc, err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and 'Traceback' not in err, err[-3000:]
    assert lines[-1].startswith('ftjax: error: ') and sum('ftjax: error' in line for line in lines) == 1, err[-3000:]
    return lines[-1]


@pytest.mark.parametrize('flag, words', [
    ('--config.model.kernels=splash', ["config.model.kernels='splash'", 'TPU', "'cpu'", "['auto', 'cpu', 'xla']"]),
    ('--config.model.kernels=cudnn', ["config.model.kernels='cudnn'", 'GPU', "'cpu'"]),
    ('--config.model.path={root}/empty_model', ["model.path='{root}/empty_model'", 'no config.json']),
])
def test_train_refuses_in_one_line(flag, words, root, tiny_llama_dir, chat_data, tmp_path):
    os.makedirs(f'{root}/empty_model', exist_ok=True)
    exp = tiny.write_experiment(tmp_path / 'exp.py', tiny_llama_dir, chat_data)
    rc, err = run_cli('train', f'--config={exp}', f'--workdir={tmp_path / "run"}', flag.format(root=root))
    line = error_line(rc, err)
    for w in words:
        assert w.format(root=root) in line, line
    assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


def test_generate_refuses_a_model_path_in_one_line(root):
    os.makedirs(f'{root}/weights_only', exist_ok=True)
    with open(f'{root}/weights_only/config.json', 'w') as f:
        json.dump({'model_type': 'llama'}, f)
    line = error_line(*run_cli('generate', f'--model={root}/weights_only', '--prompt=hi'))
    assert 'weights_only' in line and "'vocab_size'" in line, line
    line = error_line(*run_cli('generate', '--model=hf://org/model', '--prompt=hi'))
    assert "model.path='hf://org/model'" in line and 'URL' in line, line
