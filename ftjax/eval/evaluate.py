"""Evaluation during and after training: held-out loss and accuracy (LM) or accuracy and macro-F1
(classification) with the compiled eval step, and generation-based eval (greedy answers to held-out prompts,
scored against references by `config.eval.scorer`: `ftjax.eval.scores`). lm-evaluation-harness tasks:
`ftjax.eval.harness` (and `python -m ftjax evaluate`, ftjax/cli/evaluate.py).
"""
import dataclasses
import json
import math

import jax
import numpy as np

from ftjax import data as data_lib
from ftjax.errors import ConfigError
from ftjax.eval import scores
from ftjax.infer import generate_text
from ftjax.logs import Progress


# --- loss / accuracy / F1 over the eval split ---------------------------------------------------------------


def eval_batches(dataset, batch_size, limit=0, pad_to_multiple_of=0):
    """The eval split in order, in full batches (a short last batch is padded with masked rows); with
    `pad_to_multiple_of` > 0, each batch only as long as its longest row needs (`data_lib.batch_length`)."""
    n = len(dataset)
    lengths = data_lib.row_lengths(dataset) if pad_to_multiple_of > 0 else None  # [n]
    steps = math.ceil(n / batch_size)
    if limit:
        steps = min(steps, limit)
    for i in range(steps):
        idx = np.arange(i * batch_size, (i + 1) * batch_size)  # the global batch (past n: padding rows)
        length = None if lengths is None else data_lib.batch_length(lengths[idx[idx < n]], dataset.max_length,
                                                                    pad_to_multiple_of)
        idx = idx[data_lib.process_slice(batch_size, jax.process_index(), jax.process_count())]
        valid = idx < n
        yield data_lib.take_rows(dataset, np.where(valid, idx, 0), valid, length=length)


def num_eval_batches(dataset, batch_size, limit=0):
    steps = math.ceil(len(dataset) / batch_size)
    return min(steps, limit) if limit else steps


def eval_split(p_eval, state, dataset, config, batch_sh, task):
    """Eval loss / perplexity / token accuracy (LM) or accuracy / F1 (classification)."""
    sums = {}
    preds, labels = [], []
    total = num_eval_batches(dataset, config.train.batch_size, config.train.eval_batches)
    progress = Progress('eval', total, unit='batches', min_interval_s=10.0, leave=False)
    for i, batch in enumerate(eval_batches(dataset, config.train.batch_size, config.train.eval_batches,
                                           config.data.pad_to_multiple_of)):
        out = jax.device_get(p_eval(state, data_lib.to_global(batch, batch_sh)))
        progress.update(i + 1)
        for k, v in out.items():
            if k in ('pred', 'label'):
                continue
            sums[k] = sums.get(k, 0.0) + float(v)
        if task == 'classification':
            keep = batch['valid'] if 'valid' in batch else np.ones(len(batch['label']), bool)
            preds.append(np.asarray(out['pred'])[keep])
            labels.append(np.asarray(batch['label'])[keep])
    progress.close()
    count = max(sums.get('count', 0.0), 1.0)
    loss = sums.get('loss_sum', 0.0) / count
    result = {'eval/loss': loss, 'eval/accuracy': sums.get('correct', 0.0) / count}
    for k in sorted(sums):  # other per-example sums of the eval step, e.g. preference 'rewards/margin_sum'
        if k.endswith('_sum') and k != 'loss_sum':
            result[f'eval/{k[:-4]}'] = sums[k] / count
    if task == 'lm':
        result['eval/perplexity'] = float(math.exp(min(loss, 50.0)))
    else:
        result['eval/f1'] = macro_f1(np.concatenate(preds), np.concatenate(labels))
        result['eval/examples'] = int(count)  # the held-out set's size: intervals over examples (ftjax.stats)
    return result


def macro_f1(pred, label):
    f1s = []
    for c in np.unique(np.concatenate([pred, label])):
        tp = np.sum((pred == c) & (label == c))
        fp = np.sum((pred == c) & (label != c))
        fn = np.sum((pred != c) & (label == c))
        f1s.append(2 * tp / max(2 * tp + fp + fn, 1))
    return float(np.mean(f1s)) if f1s else 0.0


# --- generation-based eval ----------------------------------------------------------------------------------


def generation_eval(pre, state, config, desc='generation eval'):
    """Greedy answers to the first `eval.generate` prompts of the eval split (`data.eval_path`: a json / jsonl /
    csv / tsv / parquet file or a hub data set, `data.eval_split`, or the held-out `data.eval_fraction`, read as
    training reads it), scored by `eval.scorer`; `desc` names the model on the progress display."""
    if not (config.data.eval_path or config.data.eval_split or config.data.eval_fraction):
        raise ConfigError("config.eval.generate > 0 needs held-out examples to take prompts and reference answers "
                          "from: set config.data.eval_path (a file or hub data set), data.eval_split or "
                          "data.eval_fraction, or --config.eval.generate=0.")
    rows = data_lib.raw_rows(config.data, 'eval', config.eval.generate)
    pairs = prompts_and_references(rows, config.data)
    current = dataclasses.replace(pre, params=jax.device_get(state.params()))
    return generate_and_score(current, pairs, config.eval.scorer, config.eval.max_new_tokens, config.eval.batch_size,
                              desc=desc)


def generate_and_score(pre, pairs, scorer='exact', max_new_tokens=64, batch_size=8, desc=None):
    """Greedy answers for each (prompt, reference), scored by `scorer` (`ftjax.eval.scores`). Returns 'score' (the
    scorer's value over all answers), 'exact_match' (the share of answers scored 1; for 'exact', 'json',
    'last_number' and 'squad_em' that is 'score'), 'scorer', 'n' and the samples (each sample's 'prompt' is the
    prompt's last user message, or the whole prompt text). `desc`: show progress, per batch."""
    scores.check(scorer)
    values, samples = [], []
    progress = Progress(desc, len(pairs), unit='prompts', announce=True) if desc else None
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        prompts = [p for p, _ in chunk]  # message lists get the chat template (once, in generate_text)
        answers = generate_text(pre, prompts, chat=not isinstance(prompts[0], str), max_new_tokens=max_new_tokens)
        for (p, ref), ans in zip(chunk, answers):
            value = scores.score(scorer, ans, ref)
            values.append(value)
            samples.append({'prompt': last_user_message(p), 'answer': ans, 'reference': ref, 'score': value,
                            'correct': value == 1.0})
        if progress is not None:
            hits = sum(v == 1.0 for v in values)
            progress.update(len(values), **({'exact': f'{hits}/{len(values)}'} if scorer in scores.PASS_FAIL else
                                            {scorer: f'{np.mean(values):.3f}'}))
    if progress is not None:
        progress.close()
    total = scores.aggregate(scorer, [s['answer'] for s in samples], [s['reference'] for s in samples])
    return {'score': total, 'exact_match': float(np.mean([v == 1.0 for v in values])) if values else 0.0,
            'scorer': scorer, 'n': len(values), 'samples': samples}


def gen_metrics(result):
    """The metrics of a `generate_and_score` result: gen/exact_match, gen/examples (the prompts scored), and
    gen/<scorer> for a graded scorer."""
    out = {'gen/exact_match': result['exact_match'], 'gen/examples': result['n']}
    if result.get('scorer', 'exact') not in scores.PASS_FAIL:
        out[f"gen/{result['scorer']}"] = result['score']
    return out


def headline(result):
    """(name, formatted value) of a `generate_and_score` result: ('exact match', '97.5%') or ('rougeL', '0.412')."""
    if result.get('scorer', 'exact') in scores.PASS_FAIL:
        return 'exact match', f"{result['exact_match']:.1%}"
    return result['scorer'], f"{result['score']:.3f}"


def last_user_message(prompt):
    """The text a person wrote: the last user message of a chat prompt, or the prompt text itself."""
    if isinstance(prompt, str):
        return prompt
    users = [m['content'] for m in prompt if m.get('role') == 'user']
    return users[-1] if users else prompt[-1]['content']


def prompts_and_references(rows, data_cfg):
    """(prompt, reference answer) per raw row, formatted exactly as training formats the prompt."""
    return [data_lib.prompt_and_answer(r, data_cfg) for r in rows]


def read_rows(path):
    """Raw rows of a json / jsonl file (for prompts and references)."""
    with open(path) as f:
        if path.endswith('.jsonl'):
            return [json.loads(line) for line in f if line.strip()]
        data = json.load(f)
    return data if isinstance(data, list) else data.get('data', data)
