"""Generation-based evaluation: greedy answers to held-out prompts, scored against references.

Scorers: 'exact' (stripped string equality), 'json' (equal JSON objects), 'last_number' (GSM8K:
the last number in the answer equals the reference's final number, the one after '####').
"""
import json
import re

import numpy as np

NUMBER = re.compile(r'-?\d[\d,]*\.?\d*')


def last_number(text):
    if '####' in text:
        text = text.split('####')[-1]
    found = NUMBER.findall(text)
    if not found:
        return None
    s = found[-1].replace(',', '').rstrip('.')
    try:
        return float(s)
    except ValueError:
        return None


def score(kind, prediction, reference):
    if kind == 'exact':
        return prediction.strip() == reference.strip()
    if kind == 'json':
        from ftjax.synthetic import score_json
        return score_json(prediction, reference)
    if kind == 'last_number':
        p, r = last_number(prediction), last_number(reference)
        return p is not None and r is not None and abs(p - r) < 1e-6
    raise ValueError(f"eval scorer {kind!r} is not one of 'exact', 'json', 'last_number'.")


def prompts_and_references(rows, data_cfg):
    """(prompt, reference answer) per raw row, formatted exactly as training formats the prompt."""
    from ftjax.data import prompt_and_answer
    return [prompt_and_answer(r, data_cfg) for r in rows]


def generation_eval(pre, pairs, scorer='exact', max_new_tokens=64, batch_size=8):
    """Greedy answers for each (prompt, reference); returns exact-match rate and the samples."""
    from ftjax.generate import generate_text
    hits, samples = [], []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        prompts = [p for p, _ in chunk]  # message lists get the chat template (once, in generate_text)
        answers = generate_text(pre, prompts, chat=not isinstance(prompts[0], str), max_new_tokens=max_new_tokens)
        for (p, ref), ans in zip(chunk, answers):
            ok = score(scorer, ans, ref)
            hits.append(ok)
            samples.append({'prompt': p[-1]['content'] if not isinstance(p, str) else p, 'answer': ans,
                            'reference': ref, 'correct': bool(ok)})
    return {'exact_match': float(np.mean(hits)) if hits else 0.0, 'n': len(hits), 'samples': samples}


def read_rows(path):
    """Raw rows of a json / jsonl file (for prompts and references)."""
    with open(path) as f:
        if path.endswith('.jsonl'):
            return [json.loads(line) for line in f if line.strip()]
        data = json.load(f)
    return data if isinstance(data, list) else data.get('data', data)
