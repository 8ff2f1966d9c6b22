// Behaviour of the attention page (transformer_jax/viz/attention_page.py inlines this
// file). The page's data is the JSON in #attention-data:
//   tokens: {source: [S], target: [T] decoder inputs, predicted: [T] tokens predicted}
//   kinds:  {kind: {name, query: side, key: side, weights: [L][N][Q][K]}}
// Decoder positions are labelled by the token they predict ('predicted'), with the
// input they were fed beside it: position t sees target[t] and predicts target[t + 1].
// Tokens are put into the page with textContent (never innerHTML), so a token such as
// "<b>" shows as itself.
(function () {
  'use strict';
  const data = JSON.parse(document.getElementById('attention-data').textContent);
  const kindSelect = document.getElementById('kind');
  const layerSelect = document.getElementById('layer');
  const headSelect = document.getElementById('head');
  const queriesDiv = document.getElementById('queries');
  const keysDiv = document.getElementById('keys');
  const links = document.getElementById('links');
  const readout = document.getElementById('readout');
  const matrix = document.getElementById('matrix');
  const SVG = 'http://www.w3.org/2000/svg';
  const SIDE_TITLES = {source: 'source', target: 'decoder input',
                       predicted: 'predicted token'};
  let active = null;  // Index of the hovered query token, or null.

  function option(select, value, text) {
    const o = document.createElement('option');
    o.value = value;
    o.textContent = text;
    select.appendChild(o);
  }
  function fill(select, values, texts) {
    const previous = select.value;
    select.textContent = '';
    values.forEach((v, i) => option(select, v, texts[i]));
    if (values.map(String).includes(previous)) select.value = previous;
  }
  function range(n) { return Array.from({length: n}, (_, i) => i); }
  function kind() { return data.kinds[kindSelect.value]; }
  function span(cls, text) {
    const s = document.createElement('span');
    s.className = cls;
    s.textContent = text;
    return s;
  }
  // How a query is named in the readout and tooltips.
  function queryName(side, i) {
    const token = data.tokens[side][i];
    return side === 'predicted' ? token + ' (input ' + data.tokens.target[i] + ')' : token;
  }

  // [Q][K] weights of the chosen kind, layer and head (or the mean over heads).
  function currentWeights() {
    const heads = kind().weights[Number(layerSelect.value)];
    if (headSelect.value !== 'mean') return heads[Number(headSelect.value)];
    return heads[0].map((row, q) => row.map((_, k) =>
        heads.reduce((sum, head) => sum + head[q][k], 0) / heads.length));
  }

  function tokenColumn(div, side, role) {
    div.textContent = '';
    const t = document.createElement('div');
    t.className = 'column-title';
    t.textContent = SIDE_TITLES[side] + ' (' + role + ')';
    div.appendChild(t);
    data.tokens[side].forEach((token, i) => {
      const el = document.createElement('div');
      el.className = 'token';
      el.dataset.index = i;
      if (role === 'keys') {
        el.appendChild(span('text', token));
        el.appendChild(span('weight', ''));
      } else {
        if (side === 'predicted') el.appendChild(span('input', data.tokens.target[i] + ' \u2192'));
        el.appendChild(span('text', token));
        el.addEventListener('mouseenter', () => setActive(i));
      }
      div.appendChild(el);
    });
  }

  function colour(w) { return 'rgba(29, 53, 87, ' + w.toFixed(4) + ')'; }

  function buildMatrix(weights, querySide, keySide) {
    const keyTokens = data.tokens[keySide];
    matrix.textContent = '';
    const head = matrix.createTHead().insertRow();
    head.appendChild(document.createElement('th'));
    keyTokens.forEach(token => {
      const th = document.createElement('th');
      th.textContent = token;
      head.appendChild(th);
    });
    const body = matrix.createTBody();
    weights.forEach((row, q) => {
      const tr = body.insertRow();
      tr.dataset.index = q;
      const th = document.createElement('th');
      th.textContent = data.tokens[querySide][q];
      th.title = queryName(querySide, q);
      tr.appendChild(th);
      row.forEach((w, k) => {
        const td = tr.insertCell();
        td.dataset.weight = w.toFixed(4);
        td.title = queryName(querySide, q) + ' \u2192 ' + keyTokens[k] + ': ' + w.toFixed(4);
        td.style.background = colour(w);
      });
      tr.addEventListener('mouseenter', () => setActive(q));
    });
  }

  function drawLinks(weights) {
    const box = document.getElementById('tokens').getBoundingClientRect();
    const queryEls = queriesDiv.querySelectorAll('.token');
    const keyEls = keysDiv.querySelectorAll('.token');
    links.textContent = '';
    const height = Math.max(queriesDiv.offsetHeight, keysDiv.offsetHeight);
    links.setAttribute('height', height);
    links.style.height = height + 'px';
    const middle = el => {
      const r = el.getBoundingClientRect();
      return r.top + r.height / 2 - box.top;
    };
    weights.forEach((row, q) => {
      if (active !== null && q !== active) return;
      row.forEach((w, k) => {
        if (w < 0.005) return;
        const line = document.createElementNS(SVG, 'line');
        line.setAttribute('x1', 2);
        line.setAttribute('x2', 158);
        line.setAttribute('y1', middle(queryEls[q]));
        line.setAttribute('y2', middle(keyEls[k]));
        line.setAttribute('stroke', '#1d3557');
        line.setAttribute('stroke-width', active === null ? 1 : 1 + 4 * w);
        line.setAttribute('stroke-opacity', active === null ? 0.6 * w : w);
        links.appendChild(line);
      });
    });
  }

  function showActive() {
    const weights = currentWeights();
    const k = kind();
    queriesDiv.querySelectorAll('.token').forEach(el =>
        el.classList.toggle('active', Number(el.dataset.index) === active));
    matrix.querySelectorAll('tbody tr').forEach(tr =>
        tr.classList.toggle('active', Number(tr.dataset.index) === active));
    keysDiv.querySelectorAll('.token').forEach(el => {
      const w = active === null ? null : weights[active][Number(el.dataset.index)];
      el.querySelector('.weight').textContent = w === null ? '' : w.toFixed(2);
      el.dataset.weight = w === null ? '' : w.toFixed(4);
      el.style.background = w === null ? '' : 'rgba(244, 162, 97, ' + w.toFixed(4) + ')';
    });
    if (active === null) {
      readout.textContent = 'Hover a ' + SIDE_TITLES[k.query] + ' to see what it attends to.';
    } else {
      const keyTokens = data.tokens[k.key];
      const top = weights[active].map((w, i) => [w, i]).sort((a, b) => b[0] - a[0])
          .slice(0, 3).map(([w, i]) => keyTokens[i] + ' ' + w.toFixed(2));
      readout.textContent = queryName(k.query, active) + ' attends most to: ' +
          top.join(', ');
    }
    drawLinks(weights);
  }

  function setActive(q) { active = q; showActive(); }

  function render() {
    const k = kind();
    if (active !== null && active >= data.tokens[k.query].length) active = null;
    tokenColumn(queriesDiv, k.query, 'queries');
    tokenColumn(keysDiv, k.key, 'keys');
    buildMatrix(currentWeights(), k.query, k.key);
    showActive();
  }

  function changeKind() {
    const k = kind();
    fill(layerSelect, range(k.weights.length), range(k.weights.length).map(String));
    const numHeads = k.weights[0].length;
    fill(headSelect, ['mean'].concat(range(numHeads)),
         ['mean of ' + numHeads].concat(range(numHeads).map(String)));
    render();
  }

  Object.keys(data.kinds).forEach(id => option(kindSelect, id, data.kinds[id].name));
  kindSelect.addEventListener('change', changeKind);
  layerSelect.addEventListener('change', render);
  headSelect.addEventListener('change', render);
  document.getElementById('tokens').addEventListener('mouseleave', () => setActive(null));
  changeKind();
})();
