"""`python -m ftjax compile_check`: compile the train step for a mesh before renting it (the library, and what
the report holds: `ftjax.compile_check`).

  python -m ftjax compile_check --config=experiments/quickstart.py --topology=v5e:2x2
  python -m ftjax compile_check --config=experiments/quickstart.py --topology=data=4,fsdp=2,tensor=1
"""
import math

import jax
from absl import app, flags

from ftjax import compile_check, sharding
from ftjax.cli import config_flag, console


def define_flags(flag_values=flags.FLAGS):
    """--config and --topology on `flag_values`."""
    fv = config_flag.define_config_flag(flag_values)
    if 'topology' not in fv:
        flags.DEFINE_string('topology', None, "A TPU topology ('v5e:2x2', 'v5p:2x2x2'; the mesh is config.mesh over "
                            "its devices), or fake CPU mesh sizes, e.g. 'data=4,fsdp=2,tensor=1' (missing axes are 1).",
                            flag_values=fv)
    flags.mark_flags_as_required(['config'], flag_values=fv)
    return fv


def main(argv):
    del argv
    fv = flags.FLAGS
    if fv.topology is None:
        raise app.UsageError('--topology is required, e.g. --topology=v5e:2x2 or --topology=data=4,fsdp=2,tensor=1.')
    if compile_check.is_tpu_topology(fv.topology):
        jax.config.update('jax_platforms', 'cpu')  # the host runs on its CPU; the program is compiled for the TPU
        devices = compile_check.tpu_devices(fv.topology)
        sizes = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(fv.config.mesh, len(devices))))
        report = compile_check.check(fv.config, sizes, devices, topology_name=fv.topology)
    else:
        topology = compile_check.parse_topology(fv.topology)
        compile_check.use_fake_cpu_devices(math.prod(topology.values()))
        report = compile_check.check(fv.config, topology)
    print(compile_check.format_report(report), flush=True)
    print(compile_check.summary_json(report), flush=True)


def run(argv=None):
    define_flags()
    console.run(main, argv)
