"""The lm-evaluation-harness backend (ftjax/eval/harness.py, ftjax/infer/): per-request log-likelihoods and
greedy generations equal lm-eval's own `hf` backend's on a tiny random Llama (float32) and local tasks, the bucketed
batches against a plain forward pass on several meshes, a training run's fine-tuned model evaluated by the trainer
(`eval.harness_tasks`) and by `python -m ftjax evaluate --workdir`, local task files, and lm-eval's command line.

The tasks are tiny YAML files written here (multiple choice, generation, rolling log-likelihood) on json files.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import ftjax
from ftjax import report
from ftjax.infer import Sampler, generate, scoring
from ftjax.infer.prompts import bucket
from ftjax.errors import ConfigError, MissingFileError
from ftjax.eval import harness
from ftjax.loop import train_and_evaluate
from ftjax.sharding import make_mesh
from tests import tiny

MC_ROWS = [{'text': t, 'label': i % 2} for i, t in enumerate([
    'great movie, loved it', 'terrible plot', 'a positive review', 'hated it', 'the quick brown fox jumps',
    'what is the capital of France? ' * 3])]
GEN_ROWS = [{'question': q, 'answer': a} for q, a in [
    ('What is the capital of France?', 'Paris'), ('2 + 2 =', '4'), ('Name a fox.', 'the quick brown fox'),
    ('Alice is', '31 years old'), ('Extract the name:', '{"name": "Alice"}')]]
TASKS = {
    'tiny_mc': '''output_type: multiple_choice
doc_to_text: "{{text}}\\nQuestion: positive or negative?\\nAnswer:"
doc_to_choice: ["negative", "positive", "a negative review", "great"]
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
''',
    'tiny_gen': '''output_type: generate_until
doc_to_text: "Q: {{question}}\\nA:"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n", "Q:"]
  max_gen_toks: 16
  do_sample: false
metric_list:
  - metric: exact_match
  - metric: chrf
''',
    'tiny_roll': '''output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
''',
}
DATA = {'tiny_mc': MC_ROWS, 'tiny_gen': GEN_ROWS,
        'tiny_roll': [{'text': t} for t in tiny._CORPUS + [' '.join(tiny._CORPUS)]]}


def write_tasks(directory):
    """The three tiny tasks as lm-eval YAMLs (`dataset_path: json`, absolute data_files) in `directory`."""
    os.makedirs(directory, exist_ok=True)
    for name, body in TASKS.items():
        data = tiny.write_jsonl(os.path.join(directory, f'{name}.jsonl'), DATA[name])
        with open(os.path.join(directory, f'{name}.yaml'), 'w') as f:
            f.write(f'task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n'
                    f'test_split: test\n{body}')
    return str(directory)


@pytest.fixture(scope='module')
def task_dir(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp('tasks'))


@pytest.fixture(scope='module')
def varied_llama_dir(tmp_path_factory):
    """A tiny random Llama whose greedy answers vary with the prompt (initializer_range 0.2; at 0.02 it repeats
    one token) and sometimes end in a stop string."""
    return tiny.make_llama_checkpoint(str(tmp_path_factory.mktemp('llama_varied')), initializer_range=0.2)


def test_ftjax_is_an_lm_eval_model():
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import get_model

    cls = harness.register()
    assert get_model('ftjax') is cls is harness.FtjaxLM and issubclass(cls, TemplateLM)
    assert get_model('hf').__name__ == 'HFLM'  # lm-eval's own table is still there
    with pytest.raises(ConfigError, match='not known to the ftjax backend'):
        cls(pretrained='unused', trust_remote_code=True)
    with pytest.raises(ConfigError, match='pretrained=PATH'):
        cls()


def test_bucketed_scores_equal_a_plain_forward_on_any_mesh(tiny_llama_dir):
    """Log-likelihoods and greedy flags of (context, continuation) requests of many lengths, with shared rows
    (one-token continuations of one context), left truncation at max_length and dummy rows, equal a forward pass
    over each whole sequence; on data=8 and on data=2 x tensor=4 alike; one program per length bucket."""
    pre = ftjax.load_pretrained(tiny_llama_dir)
    rng = np.random.default_rng(0)
    reqs = [(list(rng.integers(5, 300, rng.integers(1, 60))), list(rng.integers(5, 300, rng.integers(1, 6))))
            for _ in range(11)]
    reqs += [(reqs[0][0], [t]) for t in (7, 9, 11)]  # three choices of one context: one row
    max_length = 48

    wholes = [(c + t)[-(max_length + 1):] for c, t in reqs]
    ids = np.zeros((len(reqs), max(len(w) for w in wholes)), np.int32)  # right-padded: causal, so no effect
    for i, w in enumerate(wholes):
        ids[i, :len(w)] = w
    logits = np.asarray(pre.model.apply({'params': pre.params}, ids))  # [requests, len, vocab]
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    expected = []
    for i, ((_, cont), whole) in enumerate(zip(reqs, wholes)):
        pos = range(len(whole) - 1 - len(cont), len(whole) - 1)
        expected.append((sum(float(logp[i, p, t]) for p, t in zip(pos, cont)),
                         all(int(np.argmax(logits[i, p])) == t for p, t in zip(pos, cont))))
    for mesh in ({'data': 8, 'fsdp': 1, 'tensor': 1}, {'data': 2, 'fsdp': 1, 'tensor': 4}):
        lm = Sampler(pre, batch_size=3, mesh=make_mesh(mesh))
        assert lm.rows == (8 if mesh['data'] == 8 else 4)
        before = scoring.score_rows._cache_size()
        got = lm.loglikelihoods(reqs, max_length)
        diff = max(abs(g[0] - e[0]) for g, e in zip(got, expected))
        print(f'mesh {mesh}: max |log-likelihood difference| {diff:.2e}')
        assert diff < 1e-4 and [g[1] for g in got] == [e[1] for e in expected]
        programs = scoring.score_rows._cache_size()  # one per (length bucket, candidate count, full or short batch)
        lengths = {bucket(min(len(c) + len(t), max_length + 1) - 1) for c, t in reqs}
        assert programs - before <= len(lengths) * 2 * 2
        again = lm.loglikelihoods(reqs[::-1], max_length)[::-1]  # other batches, the same programs
        assert again == [(pytest.approx(g[0], abs=1e-5), g[1]) for g in got]
        assert scoring.score_rows._cache_size() == programs


def test_batched_generation_equals_decoding_and_stops(tiny_llama_dir):
    pre = ftjax.load_pretrained(tiny_llama_dir)
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(5, 300, n)) for n in (3, 17, 40, 5, 9)]
    lm = Sampler(pre, batch_size=2, mesh=make_mesh({'data': 2, 'fsdp': 1, 'tensor': 4}), chunk=4)
    got = lm.sample(prompts, max_new_tokens=10).tokens
    assert got == generate(pre, prompts, max_new_tokens=10)
    stopped = lm.sample(prompts, max_new_tokens=10, stop=lambda i, ids: i % 2 == 0 and len(ids) >= 2).tokens
    assert [len(s) for s in stopped] == [5, 10, 5, 10, 5]  # asked after the first token, then every 4
    assert all(s == g[:len(s)] for s, g in zip(stopped, got))


def _samples_equal(a, b, task):
    """Max |difference| of the per-request log-likelihoods (or the generations equal) of one task's samples."""
    diffs = []
    for sa, sb in zip(a['samples'][task], b['samples'][task], strict=True):
        assert sa['doc'] == sb['doc']
        for ra, rb in zip(sa['resps'], sb['resps'], strict=True):
            ra, rb = ra[0], rb[0]
            if isinstance(ra, str):
                assert ra == rb, (task, sa['doc'], ra, rb)
            elif isinstance(ra, (tuple, list)):
                assert ra[1] == rb[1], (task, sa['doc'], ra, rb)  # greedy flags
                diffs.append(abs(ra[0] - rb[0]))
            else:
                diffs.append(abs(ra - rb))
    return max(diffs, default=0.0)


@pytest.mark.slow
def test_parity_with_the_hf_backend(varied_llama_dir, task_dir):
    """lm-eval's `hf` backend and `ftjax` on the same float32 checkpoint: per-request log-likelihoods equal (max
    difference printed), greedy flags and generations identical, so the task metrics are too (the perplexities
    of the rolling task to float32 rounding); max_length=40 truncates contexts and splits the rolling windows."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    harness.register()
    tasks = sorted(TASKS)
    out = {}
    for name, args in [('hf', dict(pretrained=varied_llama_dir, dtype='float32', device='cpu', batch_size=3)),
                       ('ftjax', dict(pretrained=varied_llama_dir, batch_size=3, mesh_data=2, mesh_tensor=4))]:
        out[name] = simple_evaluate(model=name, model_args=dict(args, max_length=40), tasks=tasks, log_samples=True,
                                    task_manager=TaskManager(include_path=task_dir), bootstrap_iters=0)
    a, b = out['hf'], out['ftjax']
    for task in tasks:
        print(f"{task}: max |log-likelihood difference| {_samples_equal(a, b, task):.2e}")
        assert _samples_equal(a, b, task) < 1e-4
    gens = [s['resps'][0][0] for s in b['samples']['tiny_gen']]
    print('generations:', gens)
    assert len(set(gens)) == len(gens)  # the model answers each prompt differently
    sa, sb = harness.summarize(a), harness.summarize(b)
    print('hf:', sa, '\nftjax:', sb)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sb[key] == (sa[key] if 'perplexity' not in key and 'bits' not in key else pytest.approx(sa[key],
                                                                                                      rel=1e-5))


@pytest.mark.slow
def test_local_dataset_resolves_paths_beside_the_yaml(tmp_path, tiny_llama_dir, monkeypatch):
    """`custom_dataset: !function ftjax.eval.harness.local_dataset`: data_files relative to the YAML file,
    shared:NAME/FILE under $FTJAX_DATA, TSV as GLUE writes it; a missing file is one line naming the YAML and the key."""
    monkeypatch.setenv('FTJAX_DATA', str(tmp_path / 'data'))
    (tmp_path / 'data' / 'sent').mkdir(parents=True)
    (tmp_path / 'data' / 'sent' / 'dev.tsv').write_text('label\tcontent\n1\tloved it "a lot\n0\thated it\n')
    tasks = tmp_path / 'tasks'
    tasks.mkdir()
    tiny.write_jsonl(tasks / 'qa.jsonl', GEN_ROWS)
    common = 'custom_dataset: !function ftjax.eval.harness.local_dataset\ntest_split: test\n'
    (tasks / 'rel.yaml').write_text(f'task: rel_qa\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: '
                                    f'qa.jsonl\n{common}{TASKS["tiny_gen"]}')
    (tasks / 'shared.yaml').write_text('task: shared_sent\ndataset_path: csv\ndataset_kwargs:\n  data_files:\n    '
                                       'test: shared:sent/dev.tsv\n' + common +
                                       TASKS['tiny_mc'].replace('{{text}}', '{{content}}').replace(
                                           ', "a negative review", "great"', ''))
    lm = harness.register()(pretrained=tiny_llama_dir, batch_size=4, max_gen_toks=4)
    res = harness.run_tasks(lm, ['rel_qa', 'shared_sent'], include_path=str(tasks), bootstrap_iters=0,
                            log_samples=True)
    assert res['n-samples']['rel_qa']['effective'] == len(GEN_ROWS)
    assert [s['doc']['content'] for s in res['samples']['shared_sent']] == ['loved it "a lot', 'hated it']
    by_file = harness.run_tasks(lm, [str(tasks / 'shared.yaml')], bootstrap_iters=0)  # a YAML file as the task
    assert by_file['results']['shared_sent']['acc,none'] == res['results']['shared_sent']['acc,none']
    (tasks / 'qa.jsonl').unlink()
    with pytest.raises(MissingFileError, match=r'rel.yaml: dataset_kwargs.data_files.test=.qa.jsonl. is not a file'):
        harness.run_tasks(lm, ['rel_qa'], include_path=str(tasks))
    with pytest.raises(ConfigError, match='unknown lm-eval task'):
        harness.run_tasks(lm, ['no_such_task'], include_path=str(tasks))


@pytest.mark.slow
def test_a_runs_fine_tuned_model_by_the_trainer_and_the_command_line(tmp_path, tiny_llama_dir, chat_data, task_dir):
    """A LoRA run with eval.harness_tasks writes harness.json (its summary also in summary.json, and as report
    columns); `python -m ftjax evaluate --workdir` gives the same numbers from the checkpoint; the base model's
    differ (the adapter is in)."""
    from absl import flags

    from ftjax.cli import evaluate

    wd = str(tmp_path / 'run')
    config = tiny.tiny_config(tiny_llama_dir, chat_data, **{
        'eval.harness_tasks': ['tiny_mc', 'tiny_roll'], 'eval.harness_include_path': task_dir, 'eval.batch_size': 4})
    result = train_and_evaluate(config, wd)
    saved = json.load(open(os.path.join(wd, 'harness.json')))
    assert saved['step'] == 6 and saved['model'] == tiny_llama_dir
    assert {f'harness/{k}': v for k, v in saved['summary'].items()} == {k: v for k, v in result.items()
                                                                          if k.startswith('harness/')}
    assert 'tiny_mc/acc' in saved['summary'] and 'tiny_roll/word_perplexity' in saved['summary']
    row = report.collect(wd)[0]
    assert row['final harness/tiny_mc/acc'] == saved['summary']['tiny_mc/acc']
    assert 'final harness/tiny_mc/acc' in report.markdown_table([row])

    fv = flags.FlagValues()
    evaluate.define_flags(fv)
    out = str(tmp_path / 'again.json')
    fv([sys.argv[0], f'--workdir={wd}', '--tasks=tiny_mc,tiny_roll', f'--include_path={task_dir}', f'--out={out}',
        '--bootstrap_iters=0', '--mesh=data=4,tensor=2'])
    _, again = evaluate.run_cli(fv)
    assert again == pytest.approx(saved['summary'], rel=1e-5)
    assert json.load(open(out))['step'] == 6
    base = harness.evaluate_model(tiny_llama_dir, ['tiny_roll'], include_path=task_dir,
                                  evaluate_kwargs={'bootstrap_iters': 0})[1]
    assert base['tiny_roll/word_perplexity'] != pytest.approx(saved['summary']['tiny_roll/word_perplexity'],
                                                              rel=1e-3)


@pytest.mark.slow
def test_lm_evals_own_command_line(tmp_path, tiny_llama_dir, task_dir):
    """`python -m ftjax harness` is lm-eval's CLI (`lm_eval run ...`) with the model `ftjax` registered."""
    out = tmp_path / 'out'
    env = tiny.subprocess_env(devices=2)
    proc = subprocess.run([sys.executable, '-m', 'ftjax', 'harness', '--model', 'ftjax', '--model_args',
                           f'pretrained={tiny_llama_dir},mesh_data=2', '--batch_size', '4', '--tasks', 'tiny_mc',
                           '--include_path', task_dir, '--limit', '4', '--output_path', str(out)],
                          cwd=tiny.REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'tiny_mc' in proc.stdout and 'acc' in proc.stdout
    results = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs if f.startswith('results')]
    assert results and json.load(open(results[0]))['results']['tiny_mc']['acc,none'] in (0.0, 0.25, 0.5, 0.75, 1.0)
