"""Packing is exact: each packed example's logits equal those of the example run alone (the model's
segment mask and restarted positions keep examples apart)."""
import numpy as np
import pytest

from ftjax import data as data_lib
from tests import tiny


@pytest.mark.slow  # the fast lane has tests/test_models.py::test_decoder_segments_and_positions
def test_packed_logits_equal_each_example_alone(tiny_llama_dir, tmp_path):
    import jax.numpy as jnp
    from ftjax.models import load_pretrained
    model, params, tokenizer, _ = load_pretrained(tiny_llama_dir)
    answers = ['Paris.', 'The quick brown fox.', '42', 'a positive review, loved it', 'no', 'Alice is 31 years old.']
    path = tiny.write_jsonl(tmp_path / 'pc.jsonl', [{'prompt': f'Q{i}: ', 'completion': a}
                                                     for i, a in enumerate(answers)])
    c = data_lib.default_data_config()
    c.path, c.format, c.cache_dir = str(path), 'prompt_completion', str(tmp_path / 'c')
    c.packing, c.max_length = True, 64
    data = data_lib.build_dataset(c, tokenizer)
    batch = data_lib.take_rows(data, np.arange(len(data)))  # [rows, 64]
    assert batch['segment_ids'].max() >= 3 and len(data) < len(answers)
    logits = model.apply({'params': params}, jnp.asarray(batch['input_ids']),
                         positions=jnp.asarray(batch['positions']), segment_ids=jnp.asarray(batch['segment_ids']))
    logits = np.asarray(logits)  # [rows, seq, vocab]
    checked = 0
    for r in range(len(data)):
        for s in range(1, batch['segment_ids'][r].max() + 1):
            idx = np.nonzero(batch['segment_ids'][r] == s)[0]
            alone = model.apply({'params': params}, jnp.asarray(batch['input_ids'][r, idx][None]))  # [1, n, vocab]
            np.testing.assert_allclose(logits[r, idx], np.asarray(alone)[0], atol=1e-5, rtol=0)
            checked += 1
    assert checked == len(answers)
