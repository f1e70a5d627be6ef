"""Test set-up: 8 fake CPU devices (for the sharding tests), LLVM at -O0, float32 matmuls, the shared fixtures.

Shared plain functions (tiny_config, losses, write_experiment, REPO) are in tests/tiny.py.
"""
import os
import shutil
import tempfile


def _prune(path, limit=2 * 1024 ** 3, keep=3 * 1024 ** 3 // 2):
    """The oldest entries of the cache directory `path` deleted (by modification time) once it holds over `limit`
    bytes, until it holds at most `keep`. An entry deleted while another run reads it is a miss there."""
    try:
        entries = [(st.st_mtime, st.st_size, e.path) for e in os.scandir(path) if e.is_file() for st in [e.stat()]]
    except FileNotFoundError:
        return
    total = sum(size for _, size, _ in entries)
    if total <= limit:
        return
    for _, size, name in sorted(entries):
        if total <= keep:
            break
        try:
            os.remove(name)
        except FileNotFoundError:
            pass
        total -= size


# One persistent XLA compilation cache, shared by the xdist workers and the subprocesses the tests start (they
# inherit the environment), and kept between runs: a program compiled once (the same tiny train step in a resume
# test's three runs, SmolLM2's generation programs in several experiment smokes, every program of the previous
# run of the fast lane) is read back, not compiled again. Every program is cached, however fast it compiled
# (most of the suite's are tiny). XLA keys an entry by the program, the compile options and the jax/XLA
# versions, so an edit that changes a program misses the cache. Past 2 GB, a run starts by deleting the oldest
# entries down to 1.5 GB (`_prune`; not JAX's own eviction, which puts a file lock around every read and write).
# Where: $FTJAX_TEST_XLA_CACHE, else ~/.cache/ftjax/tests-xla ($XDG_CACHE_HOME honoured); FTJAX_TEST_XLA_CACHE=run
# gives a fresh directory removed when the run ends (no entry read from an earlier run). A
# JAX_COMPILATION_CACHE_DIR the user set is used as is.
_OWN_CACHE = None  # a directory made for this run, removed when it ends
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _where = os.environ.get("FTJAX_TEST_XLA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ftjax", "tests-xla")
    if _where != "run":
        try:
            os.makedirs(_where, exist_ok=True)
        except OSError:  # a read-only home: a cache for this run only
            _where = "run"
    if _where == "run":
        _OWN_CACHE = _where = tempfile.mkdtemp(prefix="ftjax-tests-xla-cache-")
    elif "PYTEST_XDIST_WORKER" not in os.environ:  # the controller, before the workers start
        _prune(_where)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _where
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# 8 fake CPU devices for the sharding tests. LLVM at -O0 (`xla_backend_optimization_level=0`: the level the CPU
# backend hands LLVM's optimizer and code generator): compiling is most of the suite's time and running its tiny
# programs is not, so the cold fast lane takes 3 min 51 s instead of 5 min 28 s (2-core Xeon, 2026-12-05; 425 s
# user CPU against 625 s). The numbers are IEEE float32 either way, summed in another order: a tiny LoRA Llama's
# gradients differ from -O2's by at most 5.1e-7 of each array's largest entry, inside every tolerance of the suite.
# A child process keeps these flags (`tiny.subprocess_env`); a user's XLA_FLAGS is used as is.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
# With libtpu installed (the `tpu` extra), JAX would try the TPU plugin first (and hold libtpu's lockfile):
# the suite runs on the CPU; tests/test_tpu_compile.py compiles for TPU topologies without a TPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from ftjax import synthetic  # noqa: E402
from tests import tiny  # noqa: E402


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tiny.make_tokenizer().save_pretrained(str(d))
    return str(d)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """Tiny Llama: GQA (4 heads, 2 kv heads), tied embeddings, saved by transformers."""
    return tiny.make_llama_checkpoint(str(tmp_path_factory.mktemp("llama")))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    return tiny.make_bert_checkpoint(str(tmp_path_factory.mktemp("bert")))


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory):
    """The synthetic chat task, 48 train / 8 eval rows: {'train': path, 'eval': path} for tiny.tiny_config."""
    return synthetic.write_task(str(tmp_path_factory.mktemp("chat")), n_train=48, n_eval=8, seed=0)
