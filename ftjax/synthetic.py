"""A small instruction task built by ftjax itself (no download): extract fields from a sentence as JSON.

  "Nadia Okafor, a 42-year-old pilot, lives in Lisbon."  ->  {"name": "Nadia Okafor", "age": 42, "city": "Lisbon", "job": "pilot"}

Small pretrained models answer in prose or invent keys; a short LoRA run learns the exact format.
Scored by exact match of the parsed JSON object (`eval.scorer='json'`, `ftjax.eval.evaluate.score_json`).
`write_task(dir, n_train, n_eval, seed)` writes chat-format `train.jsonl` / `eval.jsonl` (`messages`
lists) that `data.format='chat'` reads.

The preference version (`write_preference_task`, `data.format='preference'`): the same prompts, the correct
JSON as `chosen` and a plausible wrong answer as `rejected` (`wrong_answer`: a wrong value, a missing or
renamed key, or the right JSON wrapped in prose).
"""
import json
import os
import random

FIRST = ['Nadia', 'Tom', 'Aiko', 'Lucas', 'Priya', 'Omar', 'Elena', 'Kwame', 'Sofia', 'Jonas', 'Mei', 'Diego',
         'Fatima', 'Ivan', 'Chloe', 'Ravi', 'Hana', 'Mateo', 'Zara', 'Felix', 'Amara', 'Leo', 'Ines', 'Yusuf']
LAST = ['Okafor', 'Berg', 'Tanaka', 'Silva', 'Patel', 'Haddad', 'Rossi', 'Mensah', 'Novak', 'Weber', 'Chen',
        'Garcia', 'Khan', 'Petrov', 'Martin', 'Rao', 'Kim', 'Lopez', 'Ahmed', 'Fischer', 'Diallo', 'Moreau']
CITIES = ['Lisbon', 'Oslo', 'Kyoto', 'Lagos', 'Lima', 'Cairo', 'Vienna', 'Accra', 'Prague', 'Hamburg', 'Seoul',
          'Madrid', 'Karachi', 'Kazan', 'Lyon', 'Pune', 'Busan', 'Bogota', 'Nairobi', 'Dublin', 'Turin', 'Quito']
JOBS = ['pilot', 'nurse', 'teacher', 'chef', 'engineer', 'painter', 'farmer', 'lawyer', 'baker', 'dentist',
        'architect', 'librarian', 'plumber', 'journalist', 'pharmacist', 'carpenter', 'biologist', 'tailor']
TEMPLATES = [
    '{name}, a {age}-year-old {job}, lives in {city}.',
    '{name} is {age} and works as a {job} in {city}.',
    'Meet {name}: {job}, {age} years old, based in {city}.',
    'In {city}, {name} ({age}) has worked as a {job} for years.',
    'The {job} {name}, aged {age}, moved to {city} last spring.',
    '{name} from {city} is a {age}-year-old {job}.',
]
INSTRUCTION = ('Extract the person\'s name, age, city and job from the sentence. Answer with one JSON object '
               'with keys "name", "age", "city", "job" and nothing else.')


def make_example(rng):
    rec = {'name': f'{rng.choice(FIRST)} {rng.choice(LAST)}', 'age': rng.randint(19, 79),
           'city': rng.choice(CITIES), 'job': rng.choice(JOBS)}
    sentence = rng.choice(TEMPLATES).format(**rec)
    answer = json.dumps({k: rec[k] for k in ('name', 'age', 'city', 'job')})
    return {'messages': [{'role': 'user', 'content': f'{INSTRUCTION}\nSentence: {sentence}'},
                         {'role': 'assistant', 'content': answer}]}


PROSE = ['Sure! Here is the JSON: {}', '{}\nLet me know if you need anything else.', 'The answer is {}.']


def wrong_answer(answer, rng):
    """A plausible wrong answer to the JSON `answer`: one wrong value, a key missing or renamed, or prose around it."""
    rec = json.loads(answer)
    kind = rng.randrange(5)
    if kind == 0:
        rec['age'] = rec['age'] + rng.choice([-10, -1, 1, 10])
    elif kind == 1:
        rec['city'] = rng.choice([c for c in CITIES if c != rec['city']])
    elif kind == 2:
        del rec[rng.choice(['age', 'city', 'job'])]
    elif kind == 3:
        rec = {('occupation' if k == 'job' else k): v for k, v in rec.items()}
    else:
        return rng.choice(PROSE).format(answer)
    return json.dumps(rec)


def _unique_examples(rng, n):
    seen, rows = set(), []
    while len(rows) < n:
        ex = make_example(rng)
        key = ex['messages'][0]['content']
        if key not in seen:
            seen.add(key)
            rows.append(ex)
    return rows


def write_preference_task(out_dir, n_train=2000, n_eval=100, seed=0):
    """Writes preference-format train.jsonl and eval.jsonl ({prompt: [user message], chosen, rejected});
    returns their paths."""
    rng = random.Random(seed)
    rows = [{'prompt': ex['messages'][:1], 'chosen': ex['messages'][1]['content'],
             'rejected': wrong_answer(ex['messages'][1]['content'], rng)}
            for ex in _unique_examples(rng, n_train + n_eval)]
    return _write_splits(out_dir, rows, n_train)


def write_task(out_dir, n_train=2000, n_eval=100, seed=0):
    """Writes train.jsonl and eval.jsonl (disjoint sentences); returns their paths."""
    rows = _unique_examples(random.Random(seed), n_train + n_eval)
    return _write_splits(out_dir, rows, n_train)


def _write_splits(out_dir, rows, n_train):
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for split, part in (('train', rows[:n_train]), ('eval', rows[n_train:])):
        paths[split] = os.path.join(out_dir, f'{split}.jsonl')
        tmp = f'{paths[split]}.tmp{os.getpid()}'  # written whole, then renamed: readers never see half a file
        with open(tmp, 'w') as f:
            for r in part:
                f.write(json.dumps(r) + '\n')
        os.replace(tmp, paths[split])
    return paths



def use_task(c, max_length=256):
    """Points config `c` at this task as the quickstart trains on it: the chat rows packed into `max_length` tokens,
    and 40 held-out prompts answered greedily and scored as JSON (the experiments that share the task call this)."""
    c.data.path = 'synthetic:extract_json/train.jsonl'  # written under ~/.cache/ftjax when the run starts
    c.data.eval_path = 'synthetic:extract_json/eval.jsonl'
    c.data.format = 'chat'
    c.data.max_length = max_length
    c.data.packing = True
    c.eval.generate = 40
    c.eval.scorer = 'json'
    c.eval.max_new_tokens = 40
    c.eval.batch_size = 20
    return c


def use_preference_task(c, eval_prompts=32):
    """Points config `c` at the preference pairs of this task (`write_preference_task`): chosen = the exact JSON,
    rejected = a plausible wrong answer, two chat-templated sequences of ~130 SmolLM2 tokens per row; and
    `eval_prompts` held-out prompts answered greedily and scored as JSON (the likelihood displacement check)."""
    c.data.path = 'synthetic:extract_json_pref/train.jsonl'  # written under ~/.cache/ftjax when the run starts
    c.data.eval_path = 'synthetic:extract_json_pref/eval.jsonl'
    c.data.format = 'preference'
    c.data.max_length = 320
    c.eval.generate = eval_prompts
    c.eval.scorer = 'json'
    c.eval.max_new_tokens = 40
    c.eval.batch_size = 16
    return c
