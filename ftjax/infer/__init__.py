"""The inference engine: generation (greedy or sampled, n per prompt, stop ids and strings, per-token
log-probabilities) and log-likelihoods of a decoder, on any mesh. See `ftjax.infer.sampler`.

  sampling.py    greedy / temperature / top-k / top-p, and the log p of a picked token
  prompts.py     text -> ids (chat template), stop ids, bucketed left-padded batches
  scoring.py     log-likelihoods of (context, continuation) requests
  sampler.py     `Sampler`: prefill, chunked decoding with a KV cache, host-side stop checks
  generation.py  `generate` (= `ftjax.generate`) and `generate_text`: one call, one batch
"""
from ftjax.infer.generation import generate, generate_text
from ftjax.infer.prompts import encode_prompt, eos_token_ids
from ftjax.infer.sampler import Sampler, Samples

__all__ = ['Sampler', 'Samples', 'encode_prompt', 'eos_token_ids', 'generate', 'generate_text']
