"""Local data files, checked before `datasets` reads them; its failures turned into one line.

  check_file(path, kind)         exists and is not empty; text files are UTF-8 (a BOM is fine); the
                                 shapes `datasets` would misread without a word: a JSON list of
                                 non-objects (read as a 'text' column), a CSV/TSV whose first row has
                                 more fields than the header (pandas takes the first column as an index)
  explain_failure(path, kind, e) the file's fault, with its 1-based line, as a DataError; a missing
                                 package as EnvironmentSetupError; None for anything else (a bug: re-raise)

Line numbers are 1-based and count the header of a CSV/TSV file (what an editor shows); the row
numbers of bad rows (bad_rows.py) are 0-based and do not. A file is checked once per process and
version (path, size, modification time).
"""
import codecs
import csv
import functools
import json
import os

from ftjax.data.bad_rows import environment_error
from ftjax.errors import DataError

CHUNK = 1 << 20  # bytes read at a time by the UTF-8 scan
HEAD = 1 << 16  # bytes read to look at a JSON file's first value
TEXT_KINDS = ('json', 'csv', 'tsv', 'text')
JSON_TYPES = {dict: 'object', list: 'array', str: 'string', int: 'number', float: 'number', bool: 'boolean',
              type(None): 'null'}


def one_line(text, limit=300):
    """A library's message squeezed onto one line (no tracebacks or newlines in a user error)."""
    text = ' '.join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + '...'


def csv_dialect(kind):
    """(delimiter, quoting) as the loader reads the file: TSV as GLUE writes it (no quoting)."""
    return ('\t', csv.QUOTE_NONE) if kind == 'tsv' else (',', csv.QUOTE_MINIMAL)


def check_file(path, kind):
    """Raises DataError naming the file, the line and the fix; a file is checked once per version."""
    st = os.stat(path)
    _check(path, kind, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _check(path, kind, size, mtime_ns):
    if size == 0:
        raise DataError(f'{path}: the file is empty (0 bytes); point the data path at a file with examples.')
    if kind not in TEXT_KINDS:
        return
    if not _scan_utf8(path):
        raise DataError(f'{path}: the file holds only blank lines; point the data path at a file with examples.')
    if kind == 'json':
        _check_json_head(path)
    elif kind in ('csv', 'tsv'):
        _check_csv_head(path, kind)


def _scan_utf8(path):
    """Raises DataError at the first byte that is not UTF-8; True when the file has a non-blank byte."""
    offset, lines, carry, nonblank = 0, 0, b'', False
    with open(path, 'rb') as fh:
        while True:
            block = fh.read(CHUNK)
            data = carry + block
            if not data:
                return nonblank
            if offset == 0 and data.startswith(codecs.BOM_UTF8):
                data, offset = data[len(codecs.BOM_UTF8):], len(codecs.BOM_UTF8)
            try:
                data.decode('utf-8')
                used, carry = data, b''
            except UnicodeDecodeError as e:
                if block and e.reason == 'unexpected end of data':  # a character split by the chunk: read on
                    used, carry = data[:e.start], data[e.start:]
                else:
                    line = lines + data[:e.start].count(b'\n') + 1
                    ext = os.path.splitext(path)[1]
                    raise DataError(
                        f'{path}: line {line}: byte {data[e.start]:#04x} at byte offset {offset + e.start} is not '
                        f'UTF-8 ({e.reason}); re-encode the file as UTF-8, e.g. iconv -f WINDOWS-1252 -t UTF-8 '
                        f'{path} > fixed{ext}') from None
            lines += used.count(b'\n')
            offset += len(used)
            nonblank = nonblank or bool(used.strip())


def _json_type(value):
    return JSON_TYPES.get(type(value), type(value).__name__)


def _check_json_head(path):
    """A top-level list must hold objects (`datasets` reads a list of strings or numbers as 'text')."""
    with open(path, encoding='utf-8-sig') as fh:
        head = fh.read(HEAD).lstrip()
    if not head.startswith('['):
        if head[:1] not in ('{', ''):
            raise DataError(f'{path}: the file starts with {head[:20]!r}, not a JSON object; a .json/.jsonl file '
                            'must be a list of objects [{...}, ...] or one object per line (JSON lines).')
        return
    first = head[1:].lstrip()[:1]
    if first == ']':
        raise DataError(f'{path}: the JSON list is empty (no examples); point the data path at a file with '
                        'examples.')
    if first and first != '{':
        what = {'"': 'strings', '[': 'arrays'}.get(first, 'numbers or other values')
        raise DataError(f'{path}: the JSON list holds {what}, not objects; each example must be an object with '
                        'named fields, e.g. [{"text": "..."}, ...] or one {"text": "..."} per line.')


def _check_csv_head(path, kind):
    """A header and a first row; a first row with extra fields would silently become an index."""
    delimiter, quoting = csv_dialect(kind)
    with open(path, encoding='utf-8-sig', newline='') as fh:
        reader = csv.reader(fh, delimiter=delimiter, quoting=quoting)
        header = next(reader, None)
        row = next(reader, None)
        line = reader.line_num
    if not header or not any(c.strip() for c in header):
        raise DataError(f'{path}: the first line is empty; a {kind.upper()} file needs a header row naming the '
                        'columns.')
    if row is None:
        raise DataError(f'{path}: the file has a header but no rows; point the data path at a file with examples.')
    if len(row) > len(header):
        raise DataError(_extra_fields(path, kind, line, len(row), header))


def _extra_fields(path, kind, line, n, header):
    fix = ('a TSV file has no quoting, so a tab inside a text splits it: remove the tab' if kind == 'tsv' else
           'quote fields that contain a comma ("a, b")')
    return f'{path}: line {line} has {n} fields but the header has {len(header)} ({header}); {fix}.'


def explain_failure(path, kind, exc):
    """A DataError for a file `datasets` could not read, or an EnvironmentSetupError, or None (re-raise)."""
    chain, e = [exc], exc
    while (e.__cause__ or e.__context__) is not None and len(chain) < 20:
        e = e.__cause__ or e.__context__
        chain.append(e)
    for e in chain:
        if isinstance(e, (ImportError, MemoryError)):
            return environment_error(e, f'data: reading {path}')
    root = chain[-1]
    problem = None
    if kind == 'json':
        problem = _json_problem(path)
    elif kind in ('csv', 'tsv'):
        problem = _csv_problem(path, kind)
    if problem:
        return DataError(problem)
    if isinstance(root, (ValueError, StopIteration)) or type(root).__module__.startswith(('pyarrow', 'pandas')):
        why = one_line(root).rstrip('.')
        return DataError(f'{path}: cannot be read as {kind}: {type(root).__name__}: {why}; check that the file is '
                         f'valid {kind.upper()} and its rows have the same columns.')
    return None


def _json_problem(path):
    """The first line that is not a JSON object (JSON lines), or where a top-level list breaks; or None."""
    with open(path, encoding='utf-8-sig') as fh:
        head = fh.read(HEAD).lstrip()
    if head.startswith('['):
        with open(path, encoding='utf-8-sig') as fh:
            try:
                value = json.load(fh)
            except json.JSONDecodeError as e:
                return f'{path}: line {e.lineno}, column {e.colno}: invalid JSON ({e.msg}); fix the file there.'
        if not isinstance(value, list):
            return None
        bad = next((i for i, x in enumerate(value) if not isinstance(x, dict)), None)
        if bad is not None:
            return (f'{path}: item {bad} (0-based) of the JSON list is a {_json_type(value[bad])}, not an object; '
                    'each example must be an object with named fields.')
        return None
    with open(path, encoding='utf-8-sig') as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                return (f'{path}: line {n}, column {e.colno}: invalid JSON ({e.msg}); a JSON lines file holds one '
                        f'complete object per line: fix or remove line {n}.')
            if not isinstance(value, dict):
                return (f'{path}: line {n} is a JSON {_json_type(value)}, not an object; each line must be one '
                        'example object, e.g. {"text": "..."}.')
    return None


def _csv_problem(path, kind):
    """The first record with more fields than the header (pandas refuses it), or None."""
    delimiter, quoting = csv_dialect(kind)
    with open(path, encoding='utf-8-sig', newline='') as fh:
        reader = csv.reader(fh, delimiter=delimiter, quoting=quoting)
        try:
            header = next(reader, None) or []
            for row in reader:
                if len(row) > len(header):
                    return _extra_fields(path, kind, reader.line_num, len(row), header)
        except csv.Error as e:
            return f'{path}: line {reader.line_num}: {one_line(e)}; fix the quoting there.'
    return None
