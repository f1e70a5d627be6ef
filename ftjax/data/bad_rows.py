"""Bad rows: a missing field, a non-string, an empty answer, a label not in the label map.

A format function raises `BadRow(field, reason)`; tokenisation records it instead of an example, so
the verdict is cached with the tokens. Then `data.on_bad_row` decides:
  error  stop at the first bad row, naming the file, the row within it (0-based, header excluded)
         and the field;
  skip   leave bad rows out, count and log them, and still stop if they are more than
         `data.max_bad_fraction` of the split (a wrong column mapping must not pass as 'a few bad rows').
"""
import logging

import numpy as np

MAX_LISTED = 5


class BadRow(Exception):
    """A row that cannot become an example; `field` is the role ('output', 'messages', 'label', ...)."""

    def __init__(self, field, reason):
        super().__init__(f'{field}: {reason}')
        self.field, self.reason = field, reason


def describe(source, row, field, reason, fields):
    file, local = source.locate(row)
    column = fields.get(field) if field in fields else None
    col = f" (column '{column}')" if column and column != field else ''
    return f"{file}: row {local}: field '{field}'{col}: {reason}"


def apply_policy(rows, bad_field, bad_reason, source, cfg, fields):
    """Keeps the good rows among `rows` (raw row indices, sorted) -> (good rows, number of bad rows).

    bad_field / bad_reason: per raw row, '' for a good row; fields: role -> column, for the messages.
    """
    is_bad = np.asarray(bad_field, dtype=object)[rows] != ''  # [len(rows)]
    bad = rows[is_bad]
    if not len(bad):
        return rows, 0
    listed = [describe(source, int(r), bad_field[r], bad_reason[r], fields) for r in bad[:MAX_LISTED]]
    if cfg.on_bad_row == 'error':
        field = bad_field[bad[0]]
        raise ValueError(f'{listed[0]}. Fix the row, map the column with --config.data.fields.{field}=COLUMN, or '
                         f'pass --config.data.on_bad_row=skip to leave bad rows out ({len(bad)} of {len(rows)} '
                         f'rows are bad).')
    fraction = len(bad) / len(rows)
    if fraction > cfg.max_bad_fraction:
        raise ValueError(f'{len(bad)} of {len(rows)} rows ({fraction:.2%}) of {source.describe()} are bad, more than '
                         f'data.max_bad_fraction={cfg.max_bad_fraction}; is data.fields right? First: '
                         + '; '.join(listed))
    logging.warning('data: skipped %d bad rows of %d (%.2f%%) in %s; first: %s', len(bad), len(rows),
                    100 * fraction, source.describe(), '; '.join(listed))
    return rows[~is_bad], int(len(bad))
