"""Raw examples through `datasets`: local files by extension, directories of split files, or hub names.

  file.jsonl / .json / .csv / .tsv / .parquet / .txt   one file (its split is the whole file)
  'data/*.jsonl'                                        a glob, files in sorted order
  a directory                                           files named by split (train*, validation*/dev*,
                                                        test*) as datasets names them; all files if none is
  'owner/name' (+ data.name, data.split)                a hub data set (needs a network or a warm cache)

TSV is read as GLUE writes it: tab-separated, no quoting (a '"' inside a sentence is just a
character), BOM stripped. CSV/TSV cells are read as strings (no 'NA' -> NaN, no '007' -> 7).
Each file is loaded on its own, so a bad row can be reported as (file, row within that file), and
each is checked first (files.py): a missing path, an empty or non-UTF-8 file, a malformed JSON line
or CSV record stop with one line naming the file, the line and the fix.
"""
import csv
import dataclasses
import glob
import hashlib
import os

import datasets
import numpy as np

from ftjax.data import files as files_lib, locations
from ftjax.errors import DataError, MissingFileError

KINDS = {'.json': 'json', '.jsonl': 'json', '.csv': 'csv', '.tsv': 'tsv', '.parquet': 'parquet', '.txt': 'text'}
HOLDOUT_SEED = 0  # the held-out eval fraction does not move when train.seed changes


@dataclasses.dataclass
class RawSource:
    dataset: datasets.Dataset  # all parts, concatenated
    parts: list  # a label per part: the file path, or 'hub_name[split]'
    part_starts: np.ndarray  # [num_parts + 1] the first row of each part in `dataset`
    fingerprint: str  # changes when a file (or the hub revision) changes

    def locate(self, row: int):
        """(file, row within that file) of a row of `dataset`."""
        p = int(np.searchsorted(self.part_starts, row, side='right')) - 1
        return self.parts[p], int(row - self.part_starts[p])

    def describe(self):
        return self.parts[0] if len(self.parts) == 1 else f'{self.parts[0]} (+{len(self.parts) - 1} more files)'


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    path: str
    name: object  # hub config name or None
    split: str
    holdout: object = None  # None | 'train' (the rows not held out) | 'eval' (the held-out rows)
    any_split: bool = False  # a directory without split names gives all its files for any split
    key: str = 'data.path'  # the config key that named `path` (for error messages)


def plan_split(cfg, split):
    """Where the rows of `split` ('train', 'eval' or a named split) come from; None when there is no eval."""
    held_out = cfg.eval_fraction > 0 and not cfg.eval_path and not cfg.eval_split
    path = locations.resolve(cfg.path, 'data.path')  # shared:... / synthetic:... names -> files
    if split == 'train':
        return SplitPlan(path, cfg.name, cfg.split, 'train' if held_out else None)
    if split == 'eval':
        if cfg.eval_path:
            name = cfg.name if cfg.eval_path == cfg.path else None
            return SplitPlan(locations.resolve(cfg.eval_path, 'data.eval_path'), name, cfg.eval_split or 'validation',
                             any_split=True, key='data.eval_path')
        if cfg.eval_split:
            return SplitPlan(path, cfg.name, cfg.eval_split)
        if held_out:
            return SplitPlan(path, cfg.name, cfg.split, 'eval')
        return None
    return SplitPlan(path, cfg.name, split)


def holdout_rows(num_rows, fraction, part):
    """Sorted raw row indices of the 'train' or 'eval' part of a held-out split (fixed seed)."""
    perm = np.random.default_rng(HOLDOUT_SEED).permutation(num_rows)
    n_eval = min(max(1, int(round(fraction * num_rows))), num_rows - 1)
    return np.sort(perm[:n_eval] if part == 'eval' else perm[n_eval:])


def _looks_local(path):
    return (path.startswith(('/', './', '../', '~')) or os.path.splitext(path)[1].lower() in KINDS
            or any(ch in path for ch in '*?['))


def local_files(path, split, any_split=False, key='data.path'):
    """The local files of `split` under `path`, or None when `path` is not local (a hub name).

    `key` is the config key that named `path`; errors name it and the fix.
    """
    path = os.path.expanduser(path)
    if any(ch in path for ch in '*?['):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise MissingFileError(f'{key}: no files match {path!r}; check the pattern (relative paths start from '
                                   f'{os.getcwd()}), or fix --config.{key}.')
    elif os.path.isfile(path):
        files = [path]
    elif os.path.isdir(path):
        files = _directory_files(path, split, any_split, key)
    elif _looks_local(path):
        raise MissingFileError(f'{key}: {path!r} does not exist (and does not look like a hub name); fix '
                               f'--config.{key}.')
    else:
        return None
    kinds = sorted({_kind(f, key) for f in files})
    if len(kinds) > 1:
        raise DataError(f'{key}: {path!r} mixes file types {kinds}; point --config.{key} at one type (a glob).')
    return files


def _kind(f, key='data.path'):
    ext = os.path.splitext(f)[1].lower()
    if ext not in KINDS:
        raise DataError(f'{key}: {f!r}: unsupported file type {ext!r}; use one of {sorted(KINDS)}.')
    return KINDS[ext]


def _directory_files(path, split, any_split, key):
    from datasets.data_files import DataFilesDict, get_data_patterns
    try:
        patterns = get_data_patterns(path)
        by_split = DataFilesDict.from_patterns(patterns, base_path=path)
    except Exception as e:  # datasets' EmptyDatasetError and friends
        raise MissingFileError(f'{key}: no data files in directory {path!r} ({files_lib.one_line(e)}); put '
                               f'{sorted(KINDS)} files there or fix --config.{key}.') from e
    by_split = {str(k): sorted(f for f in v if os.path.splitext(f)[1].lower() in KINDS
                               and not os.path.basename(f).startswith('.')) for k, v in by_split.items()}
    by_split = {k: v for k, v in by_split.items() if v}
    if not by_split:
        raise MissingFileError(f'{key}: no {sorted(KINDS)} files in directory {path!r}; put data files there or '
                               f'fix --config.{key}.')
    named = any(p != '**' for ps in patterns.values() for p in ps)  # files named train*/dev*/test*...
    if named and split in by_split:
        return by_split[split]
    if not named and (split == 'train' or any_split):
        return by_split['train']
    raise MissingFileError(
        f'{key}: directory {path!r} has no {split!r} files (it has {sorted(by_split) if named else "no"} split '
        f'names: files named train*, validation*/dev*/val*, test*); add one, or point --config.{key} at a file.')


def _string_features(f, delimiter, quoting):
    with open(f, encoding='utf-8-sig', newline='') as fh:
        header = next(csv.reader(fh, delimiter=delimiter, quoting=quoting), None)
    return datasets.Features({c: datasets.Value('string') for c in header})


def _load_file(f, cfg):
    """One local file -> datasets.Dataset; checked first, and a loader failure named by line (files.py)."""
    kind = _kind(f)
    files_lib.check_file(f, kind)
    kwargs = dict(data_files=[f], split='train', cache_dir=cfg.cache_dir)
    if kind in ('csv', 'tsv'):
        delimiter, quoting = files_lib.csv_dialect(kind)
        kwargs.update(delimiter=delimiter, quoting=quoting, encoding='utf-8-sig', na_filter=False,
                      features=_string_features(f, delimiter, quoting))
    elif kind == 'text':
        kwargs.update(sample_by=cfg.text_sample_by, encoding='utf-8-sig')
    try:
        ds = datasets.load_dataset('csv' if kind == 'tsv' else kind, **kwargs)
    except Exception as e:  # noqa: BLE001 -- sorted out by explain_failure; anything else is re-raised
        err = files_lib.explain_failure(f, kind, e)
        if err is None:
            raise
        raise err from e
    if len(ds) == 0:
        raise DataError(f'{f}: the file has no rows' + (' after its header' if kind in ('csv', 'tsv') else '')
                        + '; point the data path at a file with examples.')
    return ds


def load_raw(plan: SplitPlan, cfg, hub=True) -> RawSource:
    """Loads the raw rows of a split plan (all of them: a held-out selection happens after tokenising).

    hub=False: None for a hub data set (nothing is fetched), the rows of local files otherwise.
    """
    files = local_files(plan.path, plan.split, plan.any_split, plan.key)
    if files is None:
        if not hub:
            return None
        ds = datasets.load_dataset(plan.path, plan.name, split=plan.split, cache_dir=cfg.cache_dir)
        label = f"{plan.path}{'/' + plan.name if plan.name else ''}[{plan.split}]"
        return RawSource(ds, [label], np.array([0, len(ds)]), _hash([label, ds._fingerprint]))
    parts = [_load_file(f, cfg) for f in files]
    for f, p in zip(files[1:], parts[1:]):
        if set(p.column_names) != set(parts[0].column_names):
            raise DataError(f'{plan.key}: {f} has columns {p.column_names} but {files[0]} has '
                            f'{parts[0].column_names}; the files of one split need the same columns: fix the files, '
                            f'or narrow --config.{plan.key}.')
    starts = np.concatenate([[0], np.cumsum([len(p) for p in parts])])
    try:
        ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    except ValueError as e:  # same columns, different types (e.g. label 1 in one file, 'pos' in another)
        differ = {c: str(p.features[c]) for p in parts[1:] for c in p.column_names
                  if p.features[c] != parts[0].features[c]}
        raise DataError(f'{plan.key}: the files {files} give different types to the columns {sorted(differ)} '
                        f'({files_lib.one_line(e, 160)}); make each column hold one type in every file.') from e
    return RawSource(ds, list(files), starts, _hash(list(files) + [p._fingerprint for p in parts]))


def raw_rows(cfg, split, limit):
    """The first `limit` raw rows (dicts) of `split` ('eval', 'train', ...) from wherever the data config reads
    it: a json / jsonl / csv / tsv / parquet file or directory, a hub data set, or the held-out fraction; the same
    loader (and the same errors) as training. The generation eval's prompts and references come from here."""
    plan = plan_split(cfg, split)
    if plan is None:
        raise DataError(f'no {split} split: set data.eval_path (a file, directory or hub name), data.eval_split or '
                        f'data.eval_fraction.')
    ds = load_raw(plan, cfg).dataset
    if plan.holdout:
        ds = ds.select(holdout_rows(len(ds), cfg.eval_fraction, plan.holdout))
    return ds.select(range(min(int(limit), len(ds)))).to_list()


def _hash(items):
    return hashlib.sha256('\n'.join(map(str, items)).encode()).hexdigest()[:16]
