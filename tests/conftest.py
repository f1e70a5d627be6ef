"""Test set-up: 8 fake CPU devices (for the sharding tests), float32 matmuls, shared tiny fixtures."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from tests import tiny  # noqa: E402


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
