"""The files of a run's workdir, other than its checkpoints (`ftjax.checkpoint`):

  config.json    the resolved config, written when the run starts (`prepare_workdir`)
  metrics.jsonl  one JSON object per logged step (written by `ftjax.logs.MetricsLog`)
  summary.json   the final metrics, written when the run ends cleanly
  checkpoints/   orbax step directories

The workdir may be local or a bucket (gs://..., through etils.epath, which needs gcsfs).
"""
import json

import ml_collections
from etils import epath

CONFIG_FILE = 'config.json'
METRICS_FILE = 'metrics.jsonl'
SUMMARY_FILE = 'summary.json'
CHECKPOINTS_DIR = 'checkpoints'


def load_workdir_config(workdir):
    """The resolved config a run wrote to `workdir/config.json` at its start."""
    path = epath.Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{workdir}: no config.json, so this is not the --workdir of an ftjax training run "
                                f"(or the run never started). Pass the directory given to `python -m ftjax.train "
                                f"--workdir=...`.")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def prepare_workdir(config, workdir, primary=True):
    """Refuses a used workdir when resume is off; writes the resolved config (on the `primary` process)."""
    wd = epath.Path(workdir)
    try:
        wd.mkdir(parents=True, exist_ok=True)
    except ImportError as e:
        raise ImportError(f"--workdir={workdir}: {e}. Install it on every host (pip install gcsfs for gs://) "
                          f"or use a local --workdir.") from e
    ckpt_dir = wd / CHECKPOINTS_DIR
    used = ckpt_dir.exists() and any(not p.name.startswith('.') for p in ckpt_dir.iterdir())
    if used and not config.train.resume:
        raise FileExistsError(f"{workdir} already holds checkpoints and config.train.resume=False; choose a new "
                              f"--workdir, or drop --config.train.resume=false to continue that run.")
    if primary:
        (wd / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def read_metrics(workdir):
    """The rows of `metrics.jsonl` ([] before the first one); a torn last line (a run killed mid-write) is ignored."""
    path = epath.Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def write_summary(workdir, result):
    """`summary.json`: the final metrics of a run that ended cleanly (`ftjax.report` reads it)."""
    (epath.Path(workdir) / SUMMARY_FILE).write_text(json.dumps(result, indent=2))
