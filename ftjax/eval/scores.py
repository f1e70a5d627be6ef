"""Scorers of generated answers against references (`config.eval.scorer`, `evaluate.generate_and_score`).

  exact        stripped string equality
  json         equal JSON objects (key order and spacing aside)
  last_number  GSM8K: the last number of the answer equals the reference's final number (the one after '####')
  squad_em     SQuAD exact match after the official normalisation (lower case, no punctuation, no articles
               a/an/the, single spaces); a list of references counts the best one
  squad_f1     SQuAD token F1 over the normalised words (the official v1.1 script's), best reference
  rouge1 / rouge2 / rougeL   ROUGE F-measure (`rouge-score`, Porter stemming as in the summarisation papers)
  bleu / chrf  sacreBLEU's corpus BLEU and chrF of all answers against the references, on 0-1 (sacreBLEU's
               score / 100); per answer: sentence BLEU / chrF

`score(kind, answer, reference)` is one answer's value in [0, 1]; `aggregate(kind, answers, references)` the
value over a set: the mean, or the corpus score for bleu / chrf. rouge-score and sacrebleu are the `eval` extra.
"""
import collections
import json
import re
import string

from ftjax.errors import ConfigError, EnvironmentSetupError

SCORERS = ('exact', 'json', 'last_number', 'squad_em', 'squad_f1', 'rouge1', 'rouge2', 'rougeL', 'bleu', 'chrf')
PASS_FAIL = ('exact', 'json', 'last_number', 'squad_em')  # each answer is right or wrong
CORPUS = ('bleu', 'chrf')
NUMBER = re.compile(r'-?\d[\d,]*\.?\d*')
_ARTICLES = re.compile(r'\b(a|an|the)\b')
_PUNCTUATION = set(string.punctuation)


def check(kind):
    if kind not in SCORERS:
        raise ConfigError(f"config.eval.scorer={kind!r} is not one of {list(SCORERS)}.")


def score(kind, prediction, reference) -> float:
    """One answer's score in [0, 1] (1.0 / 0.0 for the pass-fail scorers)."""
    check(kind)
    refs = list(reference) if isinstance(reference, (list, tuple)) else [reference]
    if kind in CORPUS:
        return _sacrebleu_sentence(kind, prediction, refs)
    return max(float(_one(kind, prediction, str(r))) for r in refs)


def aggregate(kind, predictions, references) -> float:
    """The score of a set of answers: the mean of `score`, or sacreBLEU's corpus BLEU / chrF / 100."""
    check(kind)
    if not predictions:
        return 0.0
    if kind in CORPUS:
        return _sacrebleu_corpus(kind, predictions, references)
    return sum(score(kind, p, r) for p, r in zip(predictions, references)) / len(predictions)


def _one(kind, prediction, reference):
    if kind == 'exact':
        return prediction.strip() == reference.strip()
    if kind == 'json':
        return score_json(prediction, reference)
    if kind == 'last_number':
        p, r = last_number(prediction), last_number(reference)
        return p is not None and r is not None and abs(p - r) < 1e-6
    if kind == 'squad_em':
        return normalize_answer(prediction) == normalize_answer(reference)
    if kind == 'squad_f1':
        return squad_f1(prediction, reference)
    return rouge(kind, prediction, reference)


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


def score_json(prediction: str, reference: str) -> bool:
    """Exact match of the JSON objects (key order and spacing do not matter)."""
    try:
        return json.loads(prediction.strip()) == json.loads(reference)
    except (ValueError, TypeError):
        return False


# --- SQuAD (the official v1.1 evaluation script's normalisation and F1) -------------------------------------


def normalize_answer(text: str) -> str:
    """Lower case, punctuation removed, articles (a, an, the) removed, whitespace collapsed."""
    text = ''.join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return ' '.join(_ARTICLES.sub(' ', text).split())


def squad_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    same = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


# --- ROUGE (rouge-score) and BLEU / chrF (sacrebleu): the `eval` extra ----------------------------------------

_ROUGE = {}


def rouge(kind, prediction, reference) -> float:
    """ROUGE-1/2/L F-measure of `prediction` against `reference` (rouge-score, Porter stemmer)."""
    if kind not in _ROUGE:
        try:
            from rouge_score import rouge_scorer
        except ImportError as e:
            raise EnvironmentSetupError(f"config.eval.scorer={kind!r} needs rouge-score ({e}); "
                                        f"pip install 'ftjax[eval]'.") from e
        _ROUGE[kind] = rouge_scorer.RougeScorer([kind], use_stemmer=True)
    return _ROUGE[kind].score(reference, prediction)[kind].fmeasure


def _sacrebleu():
    try:
        import sacrebleu
    except ImportError as e:
        raise EnvironmentSetupError(f"the bleu / chrf scorers need sacrebleu ({e}); pip install 'ftjax[eval]'.") from e
    return sacrebleu


def _sacrebleu_sentence(kind, prediction, refs):
    sb = _sacrebleu()
    fn = sb.sentence_bleu if kind == 'bleu' else sb.sentence_chrf
    return fn(prediction, [str(r) for r in refs]).score / 100.0


def _sacrebleu_corpus(kind, predictions, references):
    """sacreBLEU over the whole set; several references per answer are allowed (lists of equal length)."""
    sb = _sacrebleu()
    refs = [list(r) if isinstance(r, (list, tuple)) else [r] for r in references]
    width = max(len(r) for r in refs)
    streams = [[str(r[i]) if i < len(r) else None for r in refs] for i in range(width)]  # None: no such reference
    fn = sb.corpus_bleu if kind == 'bleu' else sb.corpus_chrf
    return fn([str(p) for p in predictions], streams).score / 100.0
