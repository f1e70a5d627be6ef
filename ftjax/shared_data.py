"""Local copies of public data sets that experiments prefer over the hub when present.

The project's machines keep them in `../shared/data/<name>/` beside the checkout (or wherever
$FTJAX_DATA points). They are never copied into the repository: several are research-only (see
each folder's PROVENANCE.md). Without them, experiments fall back to the hub names (network needed).
"""
import os

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_root():
    return os.environ.get('FTJAX_DATA', os.path.join(_REPO, '..', 'shared', 'data'))


def local(name, filename):
    """Path of `<root>/<name>/<filename>` if it exists, else None."""
    path = os.path.join(data_root(), name, filename)
    return os.path.abspath(path) if os.path.exists(path) else None


def pick(name, filename, hub):
    """The local file when present, else the hub dataset name (the path a user with a network gets)."""
    return local(name, filename) or hub
