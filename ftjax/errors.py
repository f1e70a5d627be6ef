"""User-facing errors: what a user can fix (a config key, a file, a data row, a workdir).

Every entry point (`ftjax.cli.run`) prints a `UserError` as one line, `ftjax: error: <message>`,
and exits with `EXIT_BAD_INPUT`; anything else is a bug and keeps its traceback. The message names
the culprit (the config key, the file and row, the checkpoint step) and the fix.

Each class also derives from the built-in exception a caller would catch for the same fault
(`ConfigError` is a `ValueError`, `MissingFileError` a `FileNotFoundError`, ...), so library users
can keep catching those.
"""

EXIT_BAD_INPUT = 2  # like argparse / absl usage errors
EXIT_PREEMPTED = 75  # EX_TEMPFAIL, "try again": a preempted run saved its state; rerunning resumes


class UserError(Exception):
    """A fault of the input, not of ftjax: printed as one line, exit code 2."""


class ConfigError(UserError, ValueError):
    """A config key has a value that cannot work (names the key and the allowed values)."""


class DataError(UserError, ValueError):
    """A data file or row cannot be used (names the file, the row and the field)."""


class ModelError(UserError, ValueError):
    """A model path, checkpoint file or architecture cannot be loaded."""


class MissingFileError(UserError, FileNotFoundError):
    """A path the user gave (model, data, workdir, checkpoint) does not exist."""


class OutputExistsError(UserError, FileExistsError):
    """An output directory (an export's --out) already holds files."""


class WorkdirError(UserError, RuntimeError):
    """The workdir belongs to another run, or is not a directory."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be restored or does not belong to this run."""


class EnvironmentSetupError(UserError, RuntimeError):
    """A missing or broken installed package (not a fault of the data): names the package and the fix."""
