"""The curves and table of RL runs (one workdir per seed): held-out greedy reward and training reward per step.

  python scripts/rl_curves.py runs/grpo_seed0 runs/grpo_seed1 runs/grpo_seed2 --out docs/results/grpo_smollm2.png

Prints a markdown table: per seed the held-out greedy reward at each evaluation (step 0 = the base model), the
first step at which it reached --target, the mean time per step split into rollout / scoring / update, and
the mean and spread (min-max, sample std) over the seeds. Writes the plot when --out is given (matplotlib).
"""
import argparse
import os
import statistics

from ftjax.workdir import RunDir


def series(workdir):
    """(eval steps and rewards [(step, eval/reward)], train rows [(step, reward)], the time rows)."""
    rows = RunDir(workdir).metrics()
    evals = sorted((r['step'], r['eval/reward']) for r in rows if 'eval/reward' in r)
    train = sorted((r['step'], r['reward']) for r in rows if 'reward' in r)
    times = [r for r in rows if 'time/rollout_s' in r]
    return evals, train, times


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('workdirs', nargs='+')
    p.add_argument('--target', type=float, default=0.6)
    p.add_argument('--out', default=None)
    args = p.parse_args()
    data = {w: series(w) for w in args.workdirs}
    steps = sorted({s for evals, _, _ in data.values() for s, _ in evals})
    print('| run | ' + ' | '.join(f'step {s}' for s in steps) + f' | first step >= {args.target} | '
          's/step: rollout / score / update |')
    print('|---' * (len(steps) + 3) + '|')
    finals = []
    for w, (evals, _, times) in data.items():
        at = dict(evals)
        first = next((s for s, v in evals if v >= args.target), None)
        mean = lambda k: statistics.mean(r[k] for r in times[1:]) if len(times) > 1 else float('nan')  # noqa: E731
        print(f'| {w} | ' + ' | '.join(f'{at[s]:.3f}' if s in at else '' for s in steps) +
              f" | {first if first is not None else 'not reached'} | {mean('time/rollout_s'):.1f} / "
              f"{mean('time/score_s'):.2f} / {mean('time/update_s'):.1f} |")
        if evals:
            finals.append(evals[-1][1])
    if len(finals) > 1:
        print(f'\nfinal held-out reward over {len(finals)} runs: mean {statistics.mean(finals):.3f}, std '
              f'{statistics.stdev(finals):.3f}, min {min(finals):.3f}, max {max(finals):.3f}')
    if args.out:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        for w, (evals, train, _) in data.items():
            line, = ax.plot(*zip(*evals), marker='o', label=f'{os.path.basename(w.rstrip("/"))}: held-out greedy')
            ax.plot(*zip(*train), alpha=0.35, color=line.get_color(), label=f'{os.path.basename(w.rstrip("/"))}: rollout mean')
        ax.axhline(args.target, color='grey', ls='--', lw=0.8)
        ax.set_xlabel('step')
        ax.set_ylabel('reward (json_fields)')
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.out, dpi=120)
        print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
