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


def prompts_and_references(rows, fmt, fields, prompt_template=None):
    """(prompt messages or text, reference answer) for each raw example of a data file."""
    out = []
    for r in rows:
        if fmt == 'chat':
            msgs = r[fields.get('messages', 'messages')]
            last = max(i for i, m in enumerate(msgs) if m['role'] == 'assistant')
            out.append((msgs[:last], msgs[last]['content']))
        elif fmt == 'alpaca':
            instr, inp = r[fields.get('instruction', 'instruction')], r.get(fields.get('input', 'input')) or ''
            text = prompt_template.format(instruction=instr, input=inp) if prompt_template else \
                f'{instr}\n{inp}'.strip()
            out.append(([{'role': 'user', 'content': text}], r[fields.get('output', 'output')]))
        elif fmt == 'prompt_completion':
            out.append(([{'role': 'user', 'content': r[fields.get('prompt', 'prompt')]}],
                        r[fields.get('completion', 'completion')]))
        else:
            raise ValueError(f"generation eval needs a chat, alpaca or prompt_completion data format, not {fmt!r}.")
    return out


def generation_eval(pre, pairs, scorer='exact', max_new_tokens=64, batch_size=8, chat=True):
    """Greedy answers for each (prompt, reference); returns exact-match rate and the samples."""
    from ftjax.generate import generate_text
    hits, samples = [], []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        prompts = [p for p, _ in chunk]  # message lists: the chat template is applied once, in generate_text
        answers = generate_text(pre, prompts, chat=chat, max_new_tokens=max_new_tokens)
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
