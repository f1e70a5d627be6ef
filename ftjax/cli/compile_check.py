"""`python -m ftjax compile_check`: compile the train step for a mesh before renting it (the library, and what
the report holds: `ftjax.compile_check`).

  python -m ftjax compile_check --config=experiments/quickstart.py --topology=v5e:2x2
  python -m ftjax compile_check --config=experiments/quickstart.py --topology=data=4,fsdp=2,tensor=1
  python -m ftjax compile_check --config=experiments/quickstart.py --topology=v5e:2x2 --estimate --seq=4096
  python -m ftjax compile_check --config=... --topology=v5e:2x4 --estimate --seq=65536 --contexts=4,8

--estimate searches, per remat policy (--policies) and context size (--contexts: devices per row along the
'context' axis, taken from fsdp), the largest per-device batch whose step compiles and fits (the chip's HBM, or
--hbm_gib on fake CPU devices) at --seq tokens per row, and prints a table.
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
        flags.DEFINE_bool('estimate', False, 'search the largest per-device batch that fits, per remat policy',
                          flag_values=fv)
        flags.DEFINE_integer('seq', None, 'tokens per row (sets config.data.max_length)', flag_values=fv)
        flags.DEFINE_list('policies', list(compile_check.ESTIMATE_POLICIES), '--estimate: the model.remat values '
                          'to search', flag_values=fv)
        flags.DEFINE_float('hbm_gib', None, '--estimate on fake CPU devices: the memory per device to fit in',
                           flag_values=fv)
        flags.DEFINE_integer('max_rows', 64, '--estimate: the largest per-device batch tried', flag_values=fv)
        flags.DEFINE_list('contexts', None, '--estimate: context sizes to search too (each takes its devices from '
                          'the fsdp axis), e.g. 1,4,8', flag_values=fv)
    flags.mark_flags_as_required(['config'], flag_values=fv)
    return fv


def main(argv):
    del argv
    fv = flags.FLAGS
    if fv.topology is None:
        raise app.UsageError('--topology is required, e.g. --topology=v5e:2x2 or --topology=data=4,fsdp=2,tensor=1.')
    config = fv.config
    if fv.seq is not None:
        config.data.max_length = fv.seq
    if compile_check.is_tpu_topology(fv.topology):
        jax.config.update('jax_platforms', 'cpu')  # the host runs on its CPU; the program is compiled for the TPU
        devices, name = compile_check.tpu_devices(fv.topology), fv.topology
        sizes = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, len(devices))))
    else:
        sizes, devices, name = compile_check.parse_topology(fv.topology), None, None
        compile_check.use_fake_cpu_devices(math.prod(sizes.values()))
    if fv.estimate:
        budget = compile_check.memory_budget(name, None if fv.hbm_gib is None else int(fv.hbm_gib * (1 << 30)))
        contexts = None if not fv.contexts else [_int_flag('--contexts', v) for v in fv.contexts]
        found = compile_check.estimate(config, sizes, devices, name, fv.policies, budget, fv.max_rows,
                                       contexts=contexts)
        print(f"estimate: {config.model.path} ({config.peft.method}), {name or 'fake CPU devices'}, mesh {sizes}, "
              f"{config.data.max_length} tokens per row", flush=True)
        print(compile_check.format_estimate(found, budget), flush=True)
        return
    report = compile_check.check(config, sizes, devices, topology_name=name)
    print(compile_check.format_report(report), flush=True)
    print(compile_check.summary_json(report), flush=True)


def _int_flag(name, text):
    try:
        return int(text)
    except ValueError:
        raise app.UsageError(f'{name}: {text!r} is not an integer; give e.g. {name}=1,4,8.') from None


def run(argv=None):
    define_flags()
    console.run(main, argv)
