"""The scorers of generated answers (ftjax/eval/scores.py) against the reference implementations: SQuAD's official v1.1
normalisation and F1 on hand-made cases, rouge-score, sacrebleu; and the scorer through generation eval."""
import pytest

from ftjax import config as config_lib
from ftjax.eval import evaluate, scores
from ftjax.errors import ConfigError


@pytest.mark.parametrize('text, normalised', [
    ('The Eiffel Tower!', 'eiffel tower'),
    ('  an   apple, a pear and THE plum. ', 'apple pear and plum'),
    ('theatre', 'theatre'),                      # 'the' only as a word
    ("Queen's  English", 'queens english'),       # punctuation goes, no space added
    ('A', ''),
])
def test_squad_normalisation(text, normalised):
    assert scores.normalize_answer(text) == normalised


@pytest.mark.parametrize('prediction, reference, f1', [
    ('the Eiffel Tower', 'Eiffel Tower', 1.0),
    ('Eiffel Tower in Paris', 'the Eiffel Tower', 2 * (2 / 4) * 1.0 / (2 / 4 + 1.0)),  # P=2/4, R=2/2
    ('Paris Paris', 'Paris', 2 * 0.5 * 1.0 / 1.5),  # counts clip: one shared token
    ('London', 'Paris', 0.0),
    ('the', 'a', 0.0),  # both normalise to nothing: no common token
])
def test_squad_f1_hand_made(prediction, reference, f1):
    assert scores.squad_f1(prediction, reference) == pytest.approx(f1)
    assert scores.score('squad_f1', prediction, reference) == pytest.approx(f1)


def test_squad_best_of_several_references():
    assert scores.score('squad_em', 'Denver Broncos', ['Carolina Panthers', 'the Denver Broncos']) == 1.0
    assert scores.score('squad_f1', 'Denver', ['Broncos', 'Denver Broncos']) == pytest.approx(2 / 3)
    assert scores.aggregate('squad_em', ['a cat', 'dog'], ['cat', 'cat']) == 0.5


def test_rouge_against_rouge_score_and_by_hand():
    from rouge_score import rouge_scorer

    pred, ref = 'the cat sat on the mat', 'the cat was sitting on the mat today'
    ref_scorer = rouge_scorer.RougeScorer(['rouge1', 'rouge2', 'rougeL'], use_stemmer=True)
    expected = ref_scorer.score(ref, pred)
    for kind in ('rouge1', 'rouge2', 'rougeL'):
        assert scores.score(kind, pred, ref) == pytest.approx(expected[kind].fmeasure)
    # by hand: unigrams of 'the cat sat' vs 'the cat sat on the mat': P = 3/3, R = 3/6 -> F = 2/3
    assert scores.score('rouge1', 'the cat sat', 'the cat sat on the mat') == pytest.approx(2 / 3)
    assert scores.aggregate('rougeL', [pred, ref], [ref, ref]) == pytest.approx((expected['rougeL'].fmeasure + 1) / 2)


def test_bleu_and_chrf_are_sacrebleus_corpus_scores():
    import sacrebleu

    hyps = ['the cat is on the mat', 'there is a cat on the mat', 'a dog barks loudly']
    refs = ['the cat sat on the mat', 'there is a cat on the mat', 'the dog barked']
    assert scores.aggregate('bleu', hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score / 100)
    assert scores.aggregate('chrf', hyps, refs) == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score / 100)
    assert scores.score('bleu', hyps[0], refs[0]) == pytest.approx(sacrebleu.sentence_bleu(hyps[0], [refs[0]]).score
                                                                    / 100)
    assert scores.score('bleu', refs[1], refs[1]) == pytest.approx(1.0)
    # several references per answer (unequal counts): sacrebleu's reference streams, None where one is missing
    multi = [[refs[0], 'a cat sat on a mat'], [refs[1]], [refs[2], 'the dog barks']]
    streams = [[refs[0], refs[1], refs[2]], ['a cat sat on a mat', None, 'the dog barks']]
    assert scores.aggregate('bleu', hyps, multi) == pytest.approx(sacrebleu.corpus_bleu(hyps, streams).score / 100)


def test_the_old_scorers_keep_their_answers():
    assert scores.score('exact', ' Paris\n', 'Paris') == 1.0
    assert scores.score('json', '{"a": 1, "b": 2}', '{"b":2,"a":1}') == 1.0
    assert scores.score('last_number', 'so the answer is 1,234.', 'work... #### 1234') == 1.0
    assert scores.score('last_number', 'no number', '#### 3') == 0.0
    assert scores.last_number('x #### 72') == 72.0 and scores.score_json('{"a": 1}', '{"a":1}')


def test_the_config_offers_every_scorer():
    key = next(k for k in config_lib.SCHEMA if k.name == 'eval.scorer')
    assert key.check.allowed.split(' | ') == list(scores.SCORERS)
    with pytest.raises(ConfigError, match='eval.scorer'):
        scores.score('bleurt', 'a', 'b')


def test_generation_eval_with_a_graded_scorer(tiny_llama_dir):
    """generate_and_score: each sample's score is the scorer's, the total its aggregate, exact_match the share of
    answers scored 1; a reference equal to the model's own answer scores 1."""
    import ftjax
    from ftjax.infer import generate_text

    pre = ftjax.load_pretrained(tiny_llama_dir)
    prompts = ['The quick brown fox', 'What is the capital of France?', 'a positive review.']
    answers = generate_text(pre, prompts, max_new_tokens=6)
    pairs = [(prompts[0], answers[0]), (prompts[1], 'Paris'), (prompts[2], answers[2] + ' and more words')]
    for scorer in ('squad_f1', 'chrf'):
        res = evaluate.generate_and_score(pre, pairs, scorer=scorer, max_new_tokens=6, batch_size=2)
        assert [s['answer'] for s in res['samples']] == answers
        assert res['samples'][0]['score'] == pytest.approx(1.0)
        assert res['score'] == pytest.approx(scores.aggregate(scorer, answers, [r for _, r in pairs]))
        assert res['exact_match'] == pytest.approx(sum(s['score'] == 1.0 for s in res['samples']) / 3)
        assert evaluate.gen_metrics(res) == {'gen/exact_match': res['exact_match'], 'gen/examples': 3,
                                             f'gen/{scorer}': res['score']}
        assert evaluate.headline(res) == (scorer, f"{res['score']:.3f}")
