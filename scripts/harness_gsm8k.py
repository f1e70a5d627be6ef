"""GSM8K through lm-evaluation-harness with two backends on the same SmolLM2 GGUF: ftjax's and lm-eval's own `hf`.

  python scripts/harness_gsm8k.py [--limit=50] [--num_fewshot=5] [--batch_size=8] [--backends=ftjax,hf]
      [--model=packaged:smollm2] [--workdir=RUN] [--out=runs/harness_gsm8k.json]

The task is experiments/eval_tasks/gsm8k_local.yaml (lm-eval's `gsm8k` on ../shared/data/gsm8k, offline). ftjax
loads the GGUF itself (float32, dequantized); `hf` loads the same file with transformers (`gguf_file=`, float32,
CPU). Both answer greedily with the task's stop strings. Printed and written to --out: the accuracy of each
backend (strict `#### N` and flexible last-number extraction), its wall time (model loading included, and the
evaluation alone), how many of the generations are identical, and the machine's load (`uptime`) before and after.
--workdir adds the fine-tuned model of a training run (ftjax backend only; e.g. the quickstart's run).
"""
import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from ftjax.eval import harness  # noqa: E402
from ftjax.models import packaged  # noqa: E402

TASK = os.path.join(REPO, 'experiments', 'eval_tasks')


def uptime():
    return subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()


def run(backend, args, model_args):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    start = time.time()
    if backend == 'ftjax':
        lm = harness.register()(batch_size=args.batch_size, **model_args)
    else:
        from lm_eval.models.huggingface import HFLM
        lm = HFLM(batch_size=args.batch_size, device='cpu', dtype='float32', **model_args)
    loaded = time.time()
    results = simple_evaluate(model=lm, tasks=['gsm8k_local'], limit=args.limit, num_fewshot=args.num_fewshot,
                              log_samples=True, bootstrap_iters=0,
                              task_manager=TaskManager(include_path=TASK, include_defaults=False))
    end = time.time()
    summary = harness.summarize(results)
    answers = [s['resps'][0][0] for s in results['samples']['gsm8k_local'] if s['filter'] == 'strict-match']
    return {'backend': backend, 'model_args': {k: str(v) for k, v in model_args.items()},
            'strict': summary['gsm8k_local/exact_match/strict-match'],
            'flexible': summary['gsm8k_local/exact_match/flexible-extract'],
            'load_s': loaded - start, 'eval_s': end - loaded, 'wall_s': end - start, 'answers': answers}


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--limit', type=int, default=50)
    p.add_argument('--num_fewshot', type=int, default=5)
    p.add_argument('--batch_size', type=int, default=8)
    p.add_argument('--backends', default='ftjax,hf')
    p.add_argument('--model', default='packaged:smollm2')
    p.add_argument('--workdir', default=None, help='also the fine-tuned model of this training run (ftjax)')
    p.add_argument('--out', default=os.path.join(REPO, 'runs', 'harness_gsm8k.json'))
    args = p.parse_args()
    gguf = packaged.resolve(args.model)
    report = {'limit': args.limit, 'num_fewshot': args.num_fewshot, 'batch_size': args.batch_size, 'model': gguf,
              'uptime_before': uptime(), 'runs': []}
    print('load:', report['uptime_before'], flush=True)
    plans = []
    for backend in args.backends.split(','):
        if backend == 'ftjax':
            plans.append(('ftjax', {'pretrained': gguf}))
        elif backend == 'hf':
            plans.append(('hf', {'pretrained': os.path.dirname(gguf), 'gguf_file': os.path.basename(gguf)}))
        else:
            raise SystemExit(f'--backends: {backend!r} is not ftjax or hf')
    if args.workdir:
        plans.append(('ftjax', {'workdir': args.workdir}))
    for backend, model_args in plans:
        r = run(backend, args, model_args)
        report['runs'].append(r)
        print(f"{backend} {model_args}: strict {r['strict']:.1%}, flexible {r['flexible']:.1%}, load "
              f"{r['load_s']:.0f} s, eval {r['eval_s']:.0f} s, wall {r['wall_s']:.0f} s | {uptime()}", flush=True)
    base = [r for r in report['runs'] if 'workdir' not in r['model_args']]
    if len(base) == 2:
        a, b = base[0]['answers'], base[1]['answers']
        report['identical_answers'] = sum(x == y for x, y in zip(a, b))
        print(f"identical generations: {report['identical_answers']} of {len(a)}")
    report['uptime_after'] = uptime()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(report, f, indent=1)
    print('\n| backend | model | strict-match | flexible-extract | load s | eval s | wall s |\n'
          '|---|---|---|---|---|---|---|')
    for r in report['runs']:
        model = r['model_args'].get('workdir') or os.path.basename(gguf)
        print(f"| {r['backend']} | {model} | {r['strict']:.1%} | {r['flexible']:.1%} | {r['load_s']:.0f} | "
              f"{r['eval_s']:.0f} | {r['wall_s']:.0f} |")
    print(f"load: {report['uptime_after']}\nwritten: {args.out}")


if __name__ == '__main__':
    main()
