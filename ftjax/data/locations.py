"""Named data locations in config values, resolved when a run loads its data.

Experiment files stay pure (no file writes, no look-ups when a config is parsed): they name data by
a string, and `resolve` turns it into a file when the run starts.

  shared:NAME/FILE          a local copy of a public data set: $FTJAX_DATA/NAME/FILE, by default
                            ../shared/data/NAME/FILE beside the checkout (never copied into the
                            repository: several are research-only, see each folder's PROVENANCE.md)
  synthetic:TASK/SPLIT.jsonl  a task ftjax builds itself (`ftjax.synthetic`), written on first use
                            under $FTJAX_CACHE (default ~/.cache/ftjax) and reused after that
  anything else             returned unchanged (a file, glob, directory or hub name)
"""
import os

from ftjax import synthetic
from ftjax.errors import ConfigError, MissingFileError

SHARED = 'shared:'
SYNTHETIC = 'synthetic:'
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# task -> (cache folder, writer(out_dir) -> {split: path}); the folder name changes with the content
TASKS = {
    'extract_json': ('extract_json_v1', lambda d: synthetic.write_task(d, n_train=2000, n_eval=100, seed=0)),
    'extract_json_pref': ('extract_json_pref_v1',
                          lambda d: synthetic.write_preference_task(d, n_train=2000, n_eval=100, seed=0)),
}


def data_root():
    return os.environ.get('FTJAX_DATA', os.path.join(_REPO, '..', 'shared', 'data'))


def cache_root():
    return os.environ.get('FTJAX_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'ftjax'))


def local(name, filename):
    """Path of `<data_root>/<name>/<filename>` if it exists, else None."""
    path = os.path.join(data_root(), name, filename)
    return os.path.abspath(path) if os.path.exists(path) else None


def _shared(value, key):
    rel = value[len(SHARED):]
    found = local(*rel.split('/', 1)) if '/' in rel else None
    if found is None:
        raise MissingFileError(
            f"{key}={value!r}: {os.path.join(os.path.abspath(data_root()), rel)} does not exist. The shared data "
            f"sets live in ../shared/data beside the checkout; set FTJAX_DATA=/path/to/data (the folder holding "
            f"{rel.split('/')[0]}/), or pass --config.{key}=FILE_OR_HUB_NAME.")
    return found


def _synthetic(value, key):
    task, _, split = value[len(SYNTHETIC):].partition('/')
    if task not in TASKS:
        raise ConfigError(f"{key}={value!r}: unknown synthetic task {task!r}; known: "
                          f"{', '.join(SYNTHETIC + t for t in TASKS)}.")
    folder, write = TASKS[task]
    out_dir = os.path.join(cache_root(), folder)
    path = os.path.join(out_dir, split)
    if not os.path.exists(path):
        paths = write(out_dir)  # deterministic: every process writes the same bytes
        if path not in paths.values():
            raise ConfigError(f"{key}={value!r}: the task {task!r} writes {sorted(os.path.basename(p) for p in paths.values())}"
                              f", not {split!r}.")
    return path


def resolve(value, key='data.path'):
    """The file (or unchanged path / hub name) that a config value names; `key` is for messages."""
    if not isinstance(value, str):
        return value
    if value.startswith(SHARED):
        return _shared(value, key)
    if value.startswith(SYNTHETIC):
        return _synthetic(value, key)
    return value


# GLUE tasks with a local copy under shared:NAME/: (train file, dev file, text column, pair column, label column,
# max length). The local SST-2 names its text 'sentence' in train.tsv and 'content' in dev.tsv.
SHARED_GLUE = {'sst2': ('train.tsv', 'dev.tsv', 'sentence|content', None, 'label', 64),
               'mrpc': ('train.tsv', 'dev.tsv', '#1 String', '#2 String', 'Quality', 128)}


def use_shared_glue(c, task):
    """Points config `c` at the local copy of a GLUE task (shared:sst2, shared:mrpc) as a classification task:
    data files, columns, unpacked rows of the task's max length (64 tokens for SST-2's sentences, 128 for MRPC's
    pairs)."""
    if task not in SHARED_GLUE:
        raise ConfigError(f'GLUE task {task!r} has no local copy; the shared data holds {sorted(SHARED_GLUE)}.')
    train, dev, text, pair, label, max_length = SHARED_GLUE[task]
    c.data.path, c.data.eval_path = f'{SHARED}{task}/{train}', f'{SHARED}{task}/{dev}'
    c.data.name, c.data.eval_split = None, None
    c.data.fields.text, c.data.fields.text_pair, c.data.fields.label = text, pair, label
    c.data.format = 'classification'
    c.data.max_length = max_length
    c.data.packing = False
    return c
