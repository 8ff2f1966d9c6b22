"""The interactive attention page, checked in a real headless Chromium (selenium).

The page is built from known weights, so every number it shows can be compared with
the array it came from. One browser serves all tests; they skip, saying why, only when
Debian's chromium / chromium-driver are not installed (scripts/setup.sh installs them).
"""

import html
import os
import shutil
import tempfile

import numpy as np
import pytest

from transformer_jax.viz import attention_page
from transformer_jax.viz.attention_page import AttentionPage

CHROMIUM = '/usr/bin/chromium'
CHROMEDRIVER = '/usr/bin/chromedriver'
# Tokens that would break a page which used innerHTML or let '</script>' end its data.
SOURCE = ['\u2581A', '\u2581man', '</script><b>x', '\u2581bike', '.', '</s>']
TARGET = ['<s>', '\u2581Ein', '\u2581Mann', '\u2581f\u00e4hrt', '.']
PREDICTED = TARGET[1:] + ['</s>']  # What each decoder position predicts.
LAYERS, HEADS = 2, 3


def _softmax(x, mask=None):
  if mask is not None:
    x = np.where(mask, x, -np.inf)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope='session')
def weights():
  rng = np.random.default_rng(0)
  s, t = len(SOURCE), len(TARGET)
  causal = np.tril(np.ones((t, t), bool))
  # Sharp logits so that heads differ clearly.
  return {
      'encoder_self': _softmax(3 * rng.normal(size=(LAYERS, HEADS, s, s))),
      'decoder_self': _softmax(3 * rng.normal(size=(LAYERS, HEADS, t, t)), causal),
      'cross': _softmax(3 * rng.normal(size=(LAYERS, HEADS, t, s))),
  }


@pytest.fixture(scope='session')
def page_url(weights, tmp_path_factory):
  path = tmp_path_factory.mktemp('page') / 'attention.html'
  AttentionPage(weights, SOURCE, TARGET, title='test page',
                source_text='A man </script> bike.').save(str(path))
  return path.as_uri()


@pytest.fixture(scope='session')
def browser():
  if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip(f'headless browser test needs {CHROMIUM} and {CHROMEDRIVER} '
                '(Debian packages chromium and chromium-driver; scripts/setup.sh '
                'installs them when run as root)')
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in ('--headless', '--no-sandbox', '--disable-gpu', '--disable-quic',
               '--no-first-run', '--disable-background-networking',
               '--disable-component-update', '--disable-sync', '--window-size=1200,1000'):
    options.add_argument(flag)
  profile = tempfile.mkdtemp(prefix='chromium-profile-')
  options.add_argument(f'--user-data-dir={profile}')
  options.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
  driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
  yield driver
  driver.quit()
  shutil.rmtree(profile, ignore_errors=True)


def _open(browser, url):
  browser.get(url)
  browser.get_log('browser')  # Start each test with an empty log.


def _select(browser, element_id, value):
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import Select
  Select(browser.find_element(By.ID, element_id)).select_by_value(str(value))


def _matrix(browser):
  """The heat map's weights as shown, [Q, K]."""
  rows = browser.execute_script(
      "return Array.from(document.querySelectorAll('#matrix tbody tr')).map(tr => "
      "Array.from(tr.querySelectorAll('td')).map(td => Number(td.dataset.weight)));")
  return np.array(rows)


def _errors(log):
  return [entry for entry in log if entry['level'] == 'SEVERE']


def test_page_loads_without_console_errors(browser, page_url):
  from selenium.webdriver.common.by import By
  browser.get(page_url)
  log = browser.get_log('browser')
  assert not _errors(log), log
  # The script ran: default kind is the encoder's self-attention over the source.
  keys = browser.find_elements(By.CSS_SELECTOR, '#keys .token .text')
  assert [k.text for k in keys] == SOURCE
  heads = [o.get_attribute('value') for o in
           browser.find_elements(By.CSS_SELECTOR, '#head option')]
  assert heads == ['mean'] + [str(h) for h in range(HEADS)]


def test_page_reports_script_errors(browser, tmp_path):
  """The console check above can fail: a page whose script throws is caught."""
  path = tmp_path / 'broken.html'
  page = AttentionPage({'cross': np.full((1, 1, 1, 1), 1.0)}, ['a'], ['b']).to_html()
  path.write_text(page.replace("'use strict';", "'use strict'; undefinedName();"))
  browser.get(path.as_uri())
  assert any('undefinedName' in e['message'] for e in _errors(browser.get_log('browser')))


def test_selecting_a_head_changes_the_weights(browser, page_url, weights):
  _open(browser, page_url)
  _select(browser, 'kind', 'cross')
  _select(browser, 'layer', 1)
  _select(browser, 'head', 0)
  head0 = _matrix(browser)
  # The page rounds to 4 decimals.
  np.testing.assert_allclose(head0, weights['cross'][1, 0], atol=1e-4)
  _select(browser, 'head', 2)
  head2 = _matrix(browser)
  np.testing.assert_allclose(head2, weights['cross'][1, 2], atol=1e-4)
  assert np.abs(head2 - head0).max() > 0.1
  _select(browser, 'head', 'mean')
  np.testing.assert_allclose(_matrix(browser), weights['cross'][1].mean(0), atol=2e-4)
  _select(browser, 'kind', 'decoder_self')
  _select(browser, 'head', 1)
  shown = _matrix(browser)
  np.testing.assert_allclose(shown, weights['decoder_self'][1, 1], atol=1e-4)
  assert np.all(shown[np.triu_indices(len(TARGET), 1)] == 0)  # No peeking ahead.
  assert not _errors(browser.get_log('browser'))


def test_hovering_a_token_highlights_its_row(browser, page_url, weights):
  from selenium.webdriver.common.action_chains import ActionChains
  from selenium.webdriver.common.by import By
  _open(browser, page_url)
  _select(browser, 'kind', 'cross')
  _select(browser, 'layer', 0)
  _select(browser, 'head', 1)
  query = 3
  token = browser.find_elements(By.CSS_SELECTOR, '#queries .token')[query]
  # Decoder rows are labelled by the token they predict, the fed token beside it.
  assert token.find_element(By.CSS_SELECTOR, '.text').text == PREDICTED[query]
  assert token.find_element(By.CSS_SELECTOR, '.input').text == f'{TARGET[query]} \u2192'
  ActionChains(browser).move_to_element(token).perform()
  expected = weights['cross'][0, 1, query]
  keys = browser.find_elements(By.CSS_SELECTOR, '#keys .token')
  shown = np.array([float(k.get_attribute('data-weight')) for k in keys])
  np.testing.assert_allclose(shown, expected, atol=1e-4)
  labels = [k.find_element(By.CSS_SELECTOR, '.weight').text for k in keys]
  assert labels == [f'{w:.2f}' for w in np.round(expected, 4)]
  rows = browser.find_elements(By.CSS_SELECTOR, '#matrix tbody tr')
  assert [('active' in r.get_attribute('class')) for r in rows] == [
      i == query for i in range(len(TARGET))]
  best = SOURCE[int(np.argmax(expected))]
  readout = browser.find_element(By.ID, 'readout').text
  assert readout.startswith(
      f'{PREDICTED[query]} (input {TARGET[query]}) attends most to: {best} ')
  # One line per visible weight, drawn from the hovered token only.
  lines = browser.find_elements(By.CSS_SELECTOR, '#links line')
  assert len(lines) == int(np.sum(np.round(expected, 4) >= 0.005))


def test_inline_notebook_display_runs_in_its_iframe(browser, weights, tmp_path):
  from selenium.webdriver.common.by import By
  inline = AttentionPage(weights, SOURCE, TARGET)._repr_html_()
  assert inline.startswith('<iframe srcdoc=') and 'src=' not in inline.replace('srcdoc=', '')
  path = tmp_path / 'notebook.html'
  path.write_text(f'<!DOCTYPE html><html><body>{inline}</body></html>', encoding='utf-8')
  _open(browser, path.as_uri())
  browser.switch_to.frame(browser.find_element(By.TAG_NAME, 'iframe'))
  try:
    keys = browser.find_elements(By.CSS_SELECTOR, '#keys .token .text')
    assert [k.text for k in keys] == SOURCE
  finally:
    browser.switch_to.default_content()
  assert not _errors(browser.get_log('browser'))


def test_page_is_self_contained_and_escapes_tokens(weights):
  page = AttentionPage(weights, SOURCE, TARGET, source_text='<i>x</i>').to_html()
  for external in ('http://', 'https://', ' src=', '@import', 'url('):
    assert external not in page.replace('http://www.w3.org/2000/svg', '')
  assert page.count('</script>') == 2  # Only the page's own two script elements.
  assert html.escape('<i>x</i>') in page


def test_page_rejects_weights_that_do_not_match_the_tokens(weights):
  with pytest.raises(ValueError, match=r'cross: weights must be \[L, N, predicted length 5, '
                                       r'source length 6\], got shape \(2, 3, 5, 4\)'):
    AttentionPage({'cross': weights['cross'][..., :4]}, SOURCE, TARGET)
  with pytest.raises(ValueError, match='unknown attention kind'):
    AttentionPage({'self': weights['cross']}, SOURCE, TARGET)


def test_page_is_built_from_the_packaged_asset_files(weights):
  import importlib.resources
  folder = importlib.resources.files(attention_page.__package__) / 'assets'
  page = AttentionPage(weights, SOURCE, TARGET, title='t').to_html()
  for name in attention_page.ASSETS:
    text = (folder / name).read_text('utf-8')
    assert text == attention_page.asset(name)
    if name.endswith('.html'):
      head, tail = text.split('{{ title }}', 1)[0], text.rsplit('{{ script }}', 1)[1]
      assert page.startswith(head) and page.endswith(tail)
    else:
      assert text in page
  assert '{{' not in page.replace(attention_page.asset('attention_page.js'), '')
  predicted = AttentionPage(weights, SOURCE, TARGET, predicted_tokens=list('abcde'))
  assert predicted._data()['tokens']['predicted'] == list('abcde')
  with pytest.raises(ValueError, match='4 predicted tokens for 5 decoder positions'):
    AttentionPage(weights, SOURCE, TARGET, predicted_tokens=list('abcd'))
