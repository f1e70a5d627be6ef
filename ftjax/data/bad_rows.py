"""Bad rows: a missing field, a non-string, an empty answer, a label not in the label map.

A format function raises `BadRow(field, reason)`; tokenisation records it instead of an example, so
the verdict is cached with the tokens. Then `data.on_bad_row` decides:
  error  stop at the first bad row, naming the file, the row within it (0-based, header excluded)
         and the field;
  skip   leave bad rows out, count and log them, and still stop if they are more than
         `data.max_bad_fraction` of the split (a wrong column mapping must not pass as 'a few bad rows').

Only a fault of the row itself is a bad row. An exception that is not about the row (a missing
package such as jinja2, a broken install, memory) stops at once as `EnvironmentSetupError`
(`environment_error`), whatever `data.on_bad_row` says, and is never cached as a verdict.
"""
import logging
import re

import numpy as np

from ftjax.errors import DataError, EnvironmentSetupError

MAX_LISTED = 5


class BadRow(Exception):
    """A row that cannot become an example; `field` is the role ('output', 'messages', 'label', ...)."""

    def __init__(self, field, reason):
        super().__init__(f'{field}: {reason}')
        self.field, self.reason = field, reason


def environment_error(exc, doing):
    """An exception that is not a row's fault -> EnvironmentSetupError naming the package and the fix."""
    msg = ' '.join(str(exc).split())[:300].rstrip('.')
    if isinstance(exc, MemoryError):
        return EnvironmentSetupError(f'out of memory while {doing} (not a fault of the data): free memory, or lower '
                                     f'--config.data.num_proc.')
    needs = re.search(r'requires (\S+) to be installed', msg)  # transformers: 'requires jinja2>=3.1.6 to be ...'
    pip = re.search(r'pip install (?:-U |--upgrade )?([^`\s\'"]+)', msg)
    package = getattr(exc, 'name', None) or (needs and needs.group(1)) or (pip and pip.group(1))
    fix = f"pip install '{package}'" if package else 'install the missing package named above'
    return EnvironmentSetupError(f'{doing} needs a package that is missing or broken (not a fault of the data): '
                                 f'{type(exc).__name__}: {msg}; fix: {fix}, then rerun.')


def describe(source, row, field, reason, fields):
    file, local = source.locate(row)
    column = fields.get(field) if field in fields else None
    col = f" (column '{column}')" if column and column != field else ''
    reason = ' '.join(str(reason).split())[:300]  # one line, whatever a template's message holds
    return f"{file}: row {local}: field '{field}'{col}: {reason}"


def fix_for(field):
    """What to do about a bad row of `field` (besides fixing the row)."""
    if field == 'label':
        return ('set the label set with --config.data.label_names=[...] or --config.data.num_labels=N (the '
                'model\'s classifier must have as many), map the column with --config.data.fields.label=COLUMN')
    return f'map the column with --config.data.fields.{field}=COLUMN'


def apply_policy(rows, bad_field, bad_reason, source, cfg, fields, log=True):
    """Keeps the good rows among `rows` (raw row indices, sorted) -> (good rows, number of bad rows).

    bad_field / bad_reason: per raw row, '' for a good row; fields: role -> column, for the messages;
    log: warn about skipped rows (the check before loading the model leaves that to build_dataset).
    """
    is_bad = np.asarray(bad_field, dtype=object)[rows] != ''  # [len(rows)]
    bad = rows[is_bad]
    if not len(bad):
        return rows, 0
    listed = [describe(source, int(r), bad_field[r], bad_reason[r], fields) for r in bad[:MAX_LISTED]]
    if cfg.on_bad_row == 'error':
        field = bad_field[bad[0]]
        raise DataError(f'{listed[0]}. Fix the row, {fix_for(field)}, or pass --config.data.on_bad_row=skip to '
                        f'leave bad rows out ({len(bad)} of {len(rows)} rows are bad).')
    fraction = len(bad) / len(rows)
    if fraction > cfg.max_bad_fraction:
        raise DataError(f'{len(bad)} of {len(rows)} rows ({fraction:.2%}) of {source.describe()} are bad, more than '
                        f'data.max_bad_fraction={cfg.max_bad_fraction}; is data.fields right? First: '
                        + '; '.join(listed))
    if log:
        logging.warning('data: skipped %d bad rows of %d (%.2f%%) in %s; first: %s', len(bad), len(rows),
                        100 * fraction, source.describe(), '; '.join(listed))
    return rows[~is_bad], int(len(bad))
