"""`validate_data`: the data of a config checked before the model loads (no tokenizer needed).

  validate_data(config.data, num_labels=config.model.num_labels)   # raises, or {split: rows}

For each split the run uses ('train', and 'eval' when one is configured), a local path must exist;
each file must be non-empty, UTF-8 and parseable (files.py); the columns that data.format needs
must be there (`check_columns`); classification labels must be in the label set (`check_labels`:
data.label_names / data.num_labels / the model's num_labels), with data.on_bad_row deciding about a
few bad labels as it does in training. The raw rows are read through `datasets`, so its Arrow cache
is warm for `build_dataset`. Hub data sets (non-local paths) are not fetched here: they are checked
when loaded.
"""
import numpy as np

from ftjax.config import check_data_config
from ftjax.data import bad_rows, formats, sources
from ftjax.errors import DataError


def check_columns(source, opts):
    """A required column missing from the data is a config error, whatever data.on_bad_row says."""
    have = source.dataset.column_names
    for role in formats.required_roles(opts):
        column = opts.fields.get(role) or role
        if column not in have:
            column = "' or '".join(column.split('|'))
            hint = ''
            if len(have) == 1 and len(source.dataset) and isinstance(source.dataset[0][have[0]], (list, dict)):
                hint = (f" (are the examples nested under '{have[0]}'? A JSON file must be a top-level list of "
                        'example objects, or one object per line)')
            raise DataError(f"{source.describe()}: field '{role}' needs column '{column}', which the data does not "
                            f'have (columns: {have}){hint}. Map it with --config.data.fields.{role}=COLUMN, or '
                            f'check data.format={opts.format!r}.')


def label_verdicts(values, opts):
    """(bad_field, bad_reason) per row of a raw label column: '' for a good label (parse_label's verdict)."""
    verdicts = {}
    field, reason = np.full(len(values), '', dtype=object), np.full(len(values), '', dtype=object)
    for i, v in enumerate(values):
        key = (type(v), v) if isinstance(v, (str, int, float, bool, type(None))) else None
        if key is None or key not in verdicts:
            try:
                formats.parse_label(v, opts)
                verdict = ''
            except bad_rows.BadRow as e:
                verdict = e.reason
            if key is not None:
                verdicts[key] = verdict
        else:
            verdict = verdicts[key]
        if verdict:
            field[i], reason[i] = 'label', verdict
    return field, reason


def check_labels(source, opts, cfg):
    """Labels outside the label set, under data.on_bad_row (error: the first one; skip: too many)."""
    column = opts.fields['label']
    values = source.dataset.data.column(column).to_pylist()
    field, reason = label_verdicts(values, opts)
    bad_rows.apply_policy(np.arange(len(values), dtype=np.int64), field, reason, source, cfg, opts.fields,
                          log=False)


def validate_data(cfg, num_labels=None, splits=('train', 'eval')):
    """Checks the data of `cfg` (config.data) before a model is loaded -> {split: raw rows, or None for a hub set}.

    num_labels: the model's classifier size when known (config.model.num_labels), so a label past it is
    reported now rather than as a NaN loss later. Raises ConfigError / DataError / MissingFileError /
    EnvironmentSetupError with one line naming the key, file, line or row and the fix.
    """
    check_data_config(cfg)
    opts = formats.Options.from_config(cfg, num_labels)  # label set vs the model's classifier: ConfigError
    report = {}
    for split in splits:
        plan = sources.plan_split(cfg, split)
        if plan is None:
            continue
        source = sources.load_raw(plan, cfg, hub=False)
        if source is None:  # a hub data set: checked when build_dataset loads it
            report[split] = None
            continue
        split_opts = formats.resolve_fields(opts, source.dataset.column_names)
        check_columns(source, split_opts)
        if split_opts.format == 'classification':
            check_labels(source, split_opts, cfg)
        report[split] = len(source.dataset)
    return report
