"""BLEU: the paper's tokenized multi-bleu figure and the sacreBLEU figure."""

import collections
import math
import random
import shutil
import subprocess

import pytest
import sacrebleu

from transformer_jax.inference import bleu


def _multi_bleu_by_hand(hyps, refs):
  """multi-bleu.perl's documented formula, written out independently of sacrebleu."""
  correct, total = [0] * 4, [0] * 4
  hyp_len = ref_len = 0
  for hyp, ref in zip(hyps, refs):
    h, r = hyp.split(), ref.split()
    hyp_len += len(h)
    ref_len += len(r)
    for n in range(1, 5):
      h_ngrams = collections.Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
      r_ngrams = collections.Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
      total[n - 1] += sum(h_ngrams.values())
      correct[n - 1] += sum(min(c, r_ngrams[g]) for g, c in h_ngrams.items())
  if any(c == 0 for c in correct):
    return 0.0
  bp = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
  return 100 * bp * math.exp(sum(math.log(c / t) for c, t in zip(correct, total)) / 4)


def test_tokenized_bleu_known_value():
  # Tokenized and split: 'The state ##AT##-##AT## of ##AT##-##AT## the ##AT##-##AT##
  # art model works .' (11 tokens) against the same with 'well' before '.' (12).
  # Matches: 11/11 unigrams, 9/10 bigrams, 8/9 trigrams, 7/8 4-grams; BP exp(1-12/11).
  hyp = ['The state-of-the-art model works.']
  ref = ['The state-of-the-art model works well.']
  expected = 100 * math.exp(1 - 12 / 11) * (1 * 9 / 10 * 8 / 9 * 7 / 8) ** 0.25
  assert bleu.tokenized_bleu(hyp, ref) == pytest.approx(expected, abs=1e-9)
  # Without the compound split the figure differs (fewer, longer tokens).
  assert bleu.multi_bleu([bleu._moses_tokenizer('de').tokenize(hyp[0], return_str=True)],
                         [bleu._moses_tokenizer('de').tokenize(ref[0], return_str=True)]
                         ) != pytest.approx(expected)


def test_multi_bleu_zero_precision_gives_zero():
  # No 4-gram in a 3-token hypothesis: multi-bleu.perl reports 0 (no smoothing).
  assert bleu.multi_bleu(['a b c'], ['a b c d']) == 0.0
  assert bleu.multi_bleu(['a b c d e'], ['x y z w v']) == 0.0


def test_multi_bleu_matches_formula_on_random_corpora():
  rng = random.Random(0)
  words = ['a', 'b', 'c', 'd', 'e', 'f']
  nonzero = 0
  for _ in range(20):
    refs = [' '.join(rng.choices(words, k=rng.randint(4, 12))) for _ in range(5)]
    hyps = [' '.join(r.split()[:rng.randint(3, len(r.split()))]) + ' '
            + ' '.join(rng.choices(words, k=rng.randint(0, 3))) for r in refs]
    expected = _multi_bleu_by_hand(hyps, refs)
    assert bleu.multi_bleu(hyps, refs) == pytest.approx(expected, abs=1e-9)
    nonzero += expected > 0
  assert nonzero >= 10


def test_split_compounds_like_get_ende_bleu():
  assert bleu.split_compounds('rich-text format') == 'rich ##AT##-##AT## text format'
  # perl's s///g resumes after the match, so a one-letter middle word keeps its dash.
  assert bleu.split_compounds('a-b-c -z w-') == 'a ##AT##-##AT## b-c -z w-'


@pytest.mark.skipif(shutil.which('perl') is None, reason='perl not installed')
def test_split_compounds_equals_the_perl_one_liner():
  text = 'a-b-c state-of-the-art x--y -z w- e-mail 3-4 ##AT##-##AT##'
  perl = subprocess.run(['perl', '-ple', r's{(\S)-(\S)}{$1 ##AT##-##AT## $2}g'],
                        input=text, capture_output=True, text=True, check=True)
  assert bleu.split_compounds(text) == perl.stdout.rstrip('\n')


def test_paper_tokenize_moses_escaping_and_punctuation():
  assert bleu.paper_tokenize('Er sagte: "Ja & nein."') == (
      'Er sagte : &quot; Ja &amp; nein . &quot;')


def test_sacrebleu_path_equals_corpus_bleu():
  hyps = ['The cat sat on the mat.', 'Das ist ein Test-Fall, oder?', 'Hallo Welt']
  refs = ['The cat sat on a mat.', 'Das ist ein Testfall, oder?', 'Hallo, Welt!']
  expected = sacrebleu.corpus_bleu(hyps, [refs])
  scores = bleu.compute_bleu(hyps, refs)
  assert scores.sacrebleu == pytest.approx(expected.score, abs=1e-12)
  assert 'tok:13a' in scores.sacrebleu_signature
  assert 'case:mixed' in scores.sacrebleu_signature
  assert scores.num_sentences == 3
  assert scores.tok_bleu == pytest.approx(bleu.tokenized_bleu(hyps, refs))
  assert scores.lc_tok_bleu == pytest.approx(bleu.lowercase_tokenized_bleu(hyps, refs))


def test_multi30k_tokenize_lowercases_normalizes_and_splits():
  # task1-tokenize.sh: lowercase.perl | normalize-punctuation.perl | tokenizer.perl.
  assert bleu.multi30k_tokenize('Ein Mann, der „Hallo“ sagt.') == (
      'ein mann , der &quot; hallo &quot; sagt .')


def test_lowercase_tokenized_bleu_known_value():
  # 'ein mann fährt auf einem roten fahrrad die straße entlang .' against
  # 'ein mann fährt mit einem roten fahrrad die straße hinunter .' (11 tokens each):
  # 9/11 unigrams, 6/10 bigrams, 4/9 trigrams, 2/8 4-grams match; no brevity penalty.
  hyp = ['Ein Mann fährt auf einem roten Fahrrad die Straße entlang.']
  ref = ['Ein MANN fährt mit einem roten Fahrrad die Straße hinunter.']
  expected = 100 * (9 / 11 * 6 / 10 * 4 / 9 * 2 / 8) ** 0.25
  assert bleu.lowercase_tokenized_bleu(hyp, ref) == pytest.approx(expected, abs=1e-9)
  # Case and attached punctuation change the cased figures, not this one.
  assert bleu.lowercase_tokenized_bleu([h.title() for h in hyp], ref) == pytest.approx(
      expected, abs=1e-9)
  assert bleu.tokenized_bleu(hyp, ref) < expected


def test_lowercase_tokenized_bleu_equals_sacrebleu_lowercase_13a():
  # On words, commas and full stops, Moses and sacreBLEU's 13a tokenize alike, so
  # the figure equals sacreBLEU's lowercase=True, tokenize='13a' (no smoothing).
  rng = random.Random(1)
  words = ['Hund', 'hund', 'Mann', 'läuft', 'im', 'Park', 'Straße', 'ein']
  def sentence():
    out = ' '.join(rng.choices(words, k=rng.randint(5, 10)))
    return out[:-1] + out[-1] + rng.choice(['.', ', ja.', '', '!'])
  for _ in range(5):
    refs = [sentence() for _ in range(8)]
    hyps = [sentence() if rng.random() < 0.5 else r.swapcase() for r in refs]
    expected = sacrebleu.BLEU(lowercase=True, tokenize='13a', smooth_method='none'
                              ).corpus_score(hyps, [refs]).score
    assert bleu.lowercase_tokenized_bleu(hyps, refs) == pytest.approx(expected, abs=1e-9)
    tokenized = [[bleu.multi30k_tokenize(x) for x in side] for side in (hyps, refs)]
    assert expected == pytest.approx(_multi_bleu_by_hand(*tokenized), abs=1e-9)


def test_misaligned_corpora_rejected():
  with pytest.raises(ValueError, match='2 hypotheses but 1 references'):
    bleu.compute_bleu(['a', 'b'], ['a'])
