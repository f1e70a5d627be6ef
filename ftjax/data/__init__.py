"""The data pipeline: files or hub data sets -> tokenised, packed rows -> resumable global batches.

  validate_data(config.data, num_labels=config.model.num_labels)  # before the model loads: files, columns, labels
  data = build_dataset(config.data, tokenizer, 'train', num_labels=...)  # TokenizedData, len() rows, .stats
  it = make_iterator(data, batch_size, seed, process_index=jax.process_index(),
                     process_count=jax.process_count())       # it.state / it.restore(state)
  batch = to_global(next(it), NamedSharding(mesh, P(('data', 'fsdp'))))

Every process builds the same index (tokenisation is cached, packing and permutations are
deterministic) and materialises only its own rows of each global batch.

LM batches: input_ids, target_ids (already shifted), loss_mask (float32), segment_ids (0 = pad),
positions, all [batch, max_length]. Classification: input_ids, attention_mask, token_type_ids
[batch, max_length] and label [batch].
"""
from ftjax.config import check_data_config, default_data_config
from ftjax.data import locations
from ftjax.data.check import validate_data
from ftjax.data.dataset import TokenizedData, build_dataset
from ftjax.data.formats import prompt_and_answer
from ftjax.data.iterator import DataIterator, make_iterator, process_slice, to_global
from ftjax.data.packing import batch_length, row_lengths, take_rows
from ftjax.data.sources import raw_rows

__all__ = ['DataIterator', 'TokenizedData', 'batch_length', 'build_dataset', 'check_data_config',
           'default_data_config', 'locations', 'make_iterator', 'process_slice', 'prompt_and_answer', 'raw_rows',
           'row_lengths', 'take_rows', 'to_global', 'validate_data']
