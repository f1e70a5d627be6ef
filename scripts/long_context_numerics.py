r"""Float32 logits at long context against a float64 computation: ftjax and transformers side by side.

  python scripts/long_context_numerics.py [--model=gemma3|llama3] [--lengths=1024,2048,4096,8192]

For each length, one row of real text (the same tokens for everyone) runs through
  - transformers float32, as shipped;
  - transformers float64, as shipped: `model.double()`; its rotary embedding still forms `position * inv_freq` and
    its cos/sin in float32 (transformers casts to float there on purpose), so this is *not* a float64 computation;
  - transformers float64 with the rotary embedding in float64 too (inverse frequencies from the float64 formula,
    angles and cos/sin in float64): the reference;
  - ftjax float32.
and prints max |dlogits| (over positions and vocabulary) of each float32 run against the reference, and against
transformers' shipped float64 for comparison.

Models: `gemma3` is Google's Gemma 3 270M (packaged GGUF, real weights; sliding-window and global layers with
their own RoPE bases); `llama3` is SmolLM2-135M-Instruct's real weights with Llama 3.1's `rope_scaling`
(rope_type llama3, factor 8, low/high frequency factors 1/4, original_max_position_embeddings 8192) written
into its config: a Llama-3-style RoPE with a real model's activations (the scaling changes the model; both
sides run the same one). Text: the Tiny Shakespeare file when ../shared/data has it, else a generated text.
Result and machine: docs/results/long_context_numerics.md.
"""
import math
import os
import platform
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ftjax.models import packaged  # noqa: E402
from ftjax.models.llama import lm_head_kernel, softcap  # noqa: E402
from ftjax.models.loading import load_pretrained  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum('model', 'gemma3', ['gemma3', 'llama3'], 'which model')
flags.DEFINE_string('lengths', '1024,2048,4096,8192', 'sequence lengths in tokens')
LLAMA31_SCALING = {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                   'original_max_position_embeddings': 8192}
SHAKESPEARE = '../shared/data/tinyshakespeare/input.txt'
CHUNK = 256  # positions per logits chunk


def exact_inv_freq(dim, theta, scaling):
    """Inverse frequencies in float64, the formula of transformers' `_compute_default_rope_parameters` /
    `_compute_llama3_parameters` without its float32 casts (written here, independently of ftjax)."""
    inv = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if scaling is None:
        return inv
    f, lo, hi, old = (scaling[k] for k in ('factor', 'low_freq_factor', 'high_freq_factor',
                                            'original_max_position_embeddings'))
    wavelen = 2 * math.pi / inv
    out = np.where(wavelen > old / lo, inv / f, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    mid = (wavelen <= old / lo) & (wavelen >= old / hi)
    return np.where(mid, (1 - smooth) * out / f + smooth * out, out)


def rotary_in_float64(model, torch):
    """Replaces the forward of the model's rotary embedding by a float64 one (angles and cos/sin)."""
    rot = model.model.rotary_emb
    cfg = model.config
    dim = getattr(cfg, 'head_dim', None) or cfg.hidden_size // cfg.num_attention_heads
    params = cfg.rope_parameters
    per_type = params if 'full_attention' in params or 'sliding_attention' in params else {None: params}
    exact = {}
    for kind, p in per_type.items():
        scaling = p if p.get('rope_type', 'default') == 'llama3' else None
        assert p.get('rope_type', 'default') in ('default', 'llama3'), p
        exact[kind] = torch.tensor(exact_inv_freq(dim, p['rope_theta'], scaling), dtype=torch.float64)

    def forward(x, position_ids, layer_type=None):
        freqs = position_ids[..., None].double() * exact[layer_type]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    rot.forward = forward


def text_ids(tokenize, n):
    text = open(SHAKESPEARE).read() if os.path.exists(SHAKESPEARE) else ' '.join(
        f'Line {i}: the {w} of item {i * 7 % 101} is {i * 13 % 97}.' for i, w in
        zip(range(20000), ['colour', 'size', 'name', 'price', 'age'] * 4000))
    ids = tokenize(text)
    assert len(ids) >= n, (len(ids), n)
    return ids[:n]


def model_dir(torch, transformers):
    """(path ftjax loads, a function that builds transformers' model in a dtype, tokenize)."""
    if FLAGS.model == 'gemma3':
        path = packaged.gemma3_gguf(required=True)
        d, name = os.path.split(path)
        tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
        build = lambda dtype: transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=dtype)
        return path, build, lambda t: tok(t)['input_ids']
    src = packaged.resolve('packaged:smollm2')
    d, name = os.path.split(src)
    out = tempfile.mkdtemp(prefix='ftjax-llama3-rope-')
    loaded = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    cfg = loaded.config
    cfg.rope_parameters = {'rope_theta': cfg.rope_parameters['rope_theta'], **LLAMA31_SCALING}
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, 131072)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)  # a plain, savable model
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
    tok.save_pretrained(out)
    build = lambda dtype: transformers.AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
    return out, build, lambda t: tok(t)['input_ids']


def main(argv):
    del argv
    import torch
    import transformers
    torch.set_num_threads(os.cpu_count())
    lengths = [int(x) for x in FLAGS.lengths.split(',')]
    path, build, tokenize = model_dir(torch, transformers)
    ids = text_ids(tokenize, max(lengths))
    print(f'CPU: {cpu_model()}; jax {jax.__version__}, torch {torch.__version__}, transformers '
          f'{transformers.__version__}; model {FLAGS.model} ({path})')
    ours = load_pretrained(path)  # float32
    rope = ours.config.rope_scaling if hasattr(ours.config, 'rope_scaling') else None
    print(f'ftjax config: rope_theta {ours.config.rope_theta}, scaling {rope}')
    hidden = jax.jit(lambda p, x: ours.model.apply({'params': p}, x, return_hidden=True))
    head = np.asarray(lm_head_kernel(ours.params, ours.config))  # [embed, vocab]
    hf32, hf64 = build(torch.float32).eval(), build(torch.float64).eval()
    exact = build(torch.float64).eval()
    rotary_in_float64(exact, torch)
    print('| tokens | ftjax f32 vs f64 | transformers f32 vs f64 | ratio | ftjax f32 vs transformers "f64" | '
          'transformers f32 vs transformers "f64" | s |')
    print('|---|---|---|---|---|---|---|')
    for n in lengths:
        t0 = time.time()
        x = torch.tensor([ids[:n]])
        with torch.no_grad():  # final hidden states; the logits chunk by chunk below ([8192, 262144] is 17 GB)
            h = {name: m.model(x).last_hidden_state[0] for name, m in
                 (('ref', exact), ('shipped', hf64), ('theirs', hf32))}
        mine = hidden(ours.params, jnp.asarray(x.numpy()))[0]  # [n, embed]
        worst = dict.fromkeys(('mine', 'theirs', 'mine_shipped', 'theirs_shipped'), 0.0)
        for i in range(0, n, CHUNK):
            with torch.no_grad():
                lg = {name: logits_of(m, h[name][i:i + CHUNK]) for name, m in
                      (('ref', exact), ('shipped', hf64), ('theirs', hf32))}
            m32 = np.asarray(softcap(mine[i:i + CHUNK] @ head, ours.config.final_softcap), np.float64)
            for key, a, b in (('mine', m32, lg['ref']), ('theirs', lg['theirs'], lg['ref']),
                              ('mine_shipped', m32, lg['shipped']), ('theirs_shipped', lg['theirs'], lg['shipped'])):
                worst[key] = max(worst[key], float(np.abs(a - b).max()))
        m, t = worst['mine'], worst['theirs']
        print(f"| {n} | {m:.2e} | {t:.2e} | {m / t:.2f} | {worst['mine_shipped']:.2e} | "
              f"{worst['theirs_shipped']:.2e} | {time.time() - t0:.0f} |", flush=True)
    if FLAGS.model == 'llama3':
        shutil.rmtree(path)  # the temporary copy model_dir wrote


def logits_of(model, h):
    """transformers' logits of final hidden states h [n, embed], in float64 (numpy)."""
    out = model.lm_head(h)
    cap = getattr(model.config, 'final_logit_softcapping', None)
    if cap is not None:
        out = (out / cap).tanh() * cap
    return out.double().numpy()


def cpu_model():
    try:
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        return platform.processor() or 'unknown'


if __name__ == '__main__':
    app.run(main)
