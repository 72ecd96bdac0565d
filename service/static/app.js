(() => {
'use strict';
const SIZE = 280, LINE = 20, INK = '#000', PAPER = '#fff', DEBOUNCE = 300;
const $ = (id) => document.getElementById(id);
const pad = $('pad'), drop = $('drop'), fileIn = $('file'), digitEl = $('digit'), confEl = $('conf'),
  barsEl = $('bars'), statusEl = $('status'), modelEl = $('model'), latEl = $('latency');
const setState = (s) => { document.body.dataset.state = s; };

// ---- canvas: logical 280x280 space, backing store scaled by devicePixelRatio ----
const dpr = Math.max(1, Math.min(window.devicePixelRatio || 1, 3));
pad.width = pad.height = Math.round(SIZE * dpr);
const ctx = pad.getContext('2d');
ctx.setTransform(pad.width / SIZE, 0, 0, pad.height / SIZE, 0, 0);
ctx.lineCap = ctx.lineJoin = 'round';
ctx.lineWidth = LINE;
ctx.fillStyle = ctx.strokeStyle = INK;

let inked = false, pid = null, last = null, timer = 0, seq = 0, inflight = null, meta = null;

function fillPaper() {
  ctx.save();
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.fillStyle = PAPER;
  ctx.fillRect(0, 0, pad.width, pad.height);
  ctx.restore();
}
function setInked(v) { inked = v; drop.classList.toggle('inked', v); }
function pos(e) {
  const r = pad.getBoundingClientRect();
  return { x: (e.clientX - r.left) * SIZE / r.width, y: (e.clientY - r.top) * SIZE / r.height };
}

pad.addEventListener('pointerdown', (e) => {
  if (pid !== null || (e.pointerType === 'mouse' && e.button !== 0)) return;
  e.preventDefault();
  clearTimeout(timer);
  pid = e.pointerId;
  try { pad.setPointerCapture(pid); } catch (_) { /* not critical */ }
  last = pos(e);
  ctx.beginPath();
  ctx.arc(last.x, last.y, LINE / 2, 0, Math.PI * 2);
  ctx.fill();
  setInked(true);
});
pad.addEventListener('pointermove', (e) => {
  if (e.pointerId !== pid) return;
  e.preventDefault();
  const evs = (e.getCoalescedEvents && e.getCoalescedEvents()) || [];
  ctx.beginPath();
  ctx.moveTo(last.x, last.y);
  for (const ev of (evs.length ? evs : [e])) { last = pos(ev); ctx.lineTo(last.x, last.y); }
  ctx.stroke();
});
function endStroke(e) {
  if (e.pointerId !== pid) return;
  pid = last = null;
  clearTimeout(timer);
  timer = setTimeout(predictCanvas, DEBOUNCE);
}
['pointerup', 'pointercancel', 'lostpointercapture'].forEach((t) => pad.addEventListener(t, endStroke));
pad.addEventListener('contextmenu', (e) => e.preventDefault());

function abortInflight() { seq++; if (inflight) inflight.abort(); inflight = null; }
function clearAll() {
  clearTimeout(timer);
  abortInflight();
  fillPaper();
  setInked(false);
  resetResult();
  showStatus('');
  setState('idle');
}
$('clear').addEventListener('click', clearAll);
document.addEventListener('keydown', (e) => { if (e.key === 'Escape') clearAll(); });

// ---- prediction sources ----
function predictCanvas() {
  if (!inked) return;
  // Always export 280x280, whatever the devicePixelRatio.
  const out = document.createElement('canvas');
  out.width = out.height = SIZE;
  const o = out.getContext('2d');
  o.fillStyle = PAPER;
  o.fillRect(0, 0, SIZE, SIZE);
  o.imageSmoothingQuality = 'high';
  o.drawImage(pad, 0, 0, SIZE, SIZE);
  out.toBlob((b) => (b ? predict(b, 'image/png') : fail('Could not export the drawing.')), 'image/png');
}

function handleFile(file) {
  if (!file) return;
  clearTimeout(timer);
  const fd = new FormData();
  fd.append('image', file, file.name || 'image');
  predict(fd, null);
  const my = seq;
  if (window.createImageBitmap) createImageBitmap(file).then((bmp) => {
    if (my !== seq) return;
    fillPaper();
    const s = Math.min(SIZE / bmp.width, SIZE / bmp.height), w = bmp.width * s, h = bmp.height * s;
    ctx.drawImage(bmp, (SIZE - w) / 2, (SIZE - h) / 2, w, h);
    setInked(true);
  }).catch(() => { /* undecodable here; the server will explain */ });
}
fileIn.addEventListener('change', () => {
  const f = fileIn.files && fileIn.files[0];
  fileIn.value = ''; // picking the same file again must fire 'change' again
  handleFile(f);
});

let depth = 0;
const hasFiles = (e) => e.dataTransfer && Array.from(e.dataTransfer.types || []).includes('Files');
const over = (v) => drop.classList.toggle('over', v);
// A file dropped anywhere else must not navigate away from the page.
['dragover', 'drop'].forEach((t) => window.addEventListener(t, (e) => { if (hasFiles(e)) e.preventDefault(); }));
drop.addEventListener('dragenter', (e) => { if (hasFiles(e)) { depth++; over(true); } });
drop.addEventListener('dragleave', () => { if (--depth <= 0) { depth = 0; over(false); } });
drop.addEventListener('drop', (e) => {
  depth = 0;
  over(false);
  const f = e.dataTransfer && e.dataTransfer.files[0];
  if (f) { e.preventDefault(); handleFile(f); }
});

// ---- API ----
async function predict(body, type) {
  abortInflight();
  const my = seq, ac = new AbortController(), t0 = performance.now();
  inflight = ac;
  setState('loading');
  showStatus('Predicting…');
  let res, data = null;
  try {
    const headers = { Accept: 'application/json' };
    if (type) headers['Content-Type'] = type;
    res = await fetch('/predict', { method: 'POST', body, headers, signal: ac.signal });
    const text = await res.text();
    try { data = JSON.parse(text); } catch (_) { /* not JSON */ }
  } catch (_) {
    if (my === seq) { inflight = null; fail("Can't reach the server. Check that it is running and try again."); }
    return;
  }
  if (my !== seq) return;
  inflight = null;
  if (!res.ok) {
    const e = data && data.error;
    return fail(e && (e.message || e.code) ? e : { code: 'http_' + res.status, message: 'Request failed (' + res.status + ' ' + res.statusText + ').' });
  }
  const p = data && Array.isArray(data.predictions) ? data.predictions[0] : null;
  const probs = p && Array.isArray(p.probabilities) ? p.probabilities.map(Number) : [];
  if (probs.length !== 10 || !probs.every(isFinite)) return fail('The server sent an unexpected response.');
  render(data, p, probs, performance.now() - t0);
}

// ---- rendering ----
const rows = [];
for (let d = 0; d < 10; d++) {
  const li = document.createElement('li');
  li.dataset.digit = String(d);
  li.innerHTML = '<span class="d" aria-hidden="true">' + d + '</span><span class="track" aria-hidden="true"><span class="fill"></span></span><span class="v"></span>';
  barsEl.appendChild(li);
  rows.push({ li, fill: li.querySelector('.fill'), v: li.querySelector('.v') });
}
const pct = (x) => (x * 100).toFixed(x >= 0.9995 || x < 0.0005 ? 0 : 1) + '%';
const num = (x) => typeof x === 'number' && isFinite(x);

function resetResult() {
  digitEl.textContent = '–';
  digitEl.classList.add('empty');
  digitEl.setAttribute('aria-label', 'No prediction yet');
  confEl.textContent = latEl.textContent = '\u00a0';
  rows.forEach((r) => {
    r.li.classList.remove('top');
    r.li.removeAttribute('aria-label');
    r.fill.style.width = '0%';
    r.v.textContent = '';
  });
}

function render(data, p, probs, rtt) {
  const top = probs.indexOf(Math.max(...probs));
  const digit = Number.isInteger(p.digit) ? p.digit : Number.isInteger(data.digit) ? data.digit : top;
  const conf = num(p.confidence) ? p.confidence : probs[digit];
  digitEl.textContent = String(digit);
  digitEl.classList.remove('empty');
  digitEl.setAttribute('aria-label', 'Predicted digit ' + digit);
  confEl.textContent = num(conf) ? pct(conf) + ' confident' : '';
  rows.forEach((r, i) => {
    const v = Math.max(0, Math.min(1, probs[i]));
    r.fill.style.width = (v * 100).toFixed(2) + '%';
    r.v.textContent = pct(v);
    r.li.setAttribute('aria-label', 'digit ' + i + ': ' + pct(v));
    r.li.classList.toggle('top', i === digit);
  });
  const m = data.model || {}, who = label(m.name, m.version), parts = [];
  if (who) { parts.push('answered by ' + who); showModel(m.name, m.version); }
  if (num(data.latency_ms)) parts.push('server ' + data.latency_ms.toFixed(1) + ' ms');
  parts.push('round trip ' + Math.round(rtt) + ' ms');
  latEl.textContent = parts.join(' · ');
  showStatus('');
  setState('predicted');
}

function fail(err) {
  const e = typeof err === 'string' ? { message: err } : err;
  const b = document.createElement('strong');
  b.textContent = 'Error' + (e.code ? ' (' + e.code + ')' : '') + ': ';
  statusEl.className = 'status error';
  statusEl.textContent = '';
  statusEl.append(b, String(e.message || 'Something went wrong.'));
  resetResult();
  setState('error');
}
function showStatus(msg) { statusEl.className = 'status'; statusEl.textContent = msg; }

// ---- model info ----
function label(name, v) { return [name, v != null && v !== '' ? 'v' + v : ''].filter(Boolean).join(' '); }
function accuracy(md) {
  const mf = (md && md.manifest) || {};
  for (const c of [mf.test_accuracy, mf.metrics && mf.metrics.test_accuracy, md.test_accuracy]) {
    const n = Number(c);
    if (c != null && c !== '' && n > 0) return n <= 1 ? n * 100 : n;
  }
  return null;
}
function showModel(name, v) {
  const acc = meta && (v == null || String(meta.version) === String(v)) ? accuracy(meta) : null;
  const lbl = label(name || (meta && meta.name), v != null ? v : meta && meta.version);
  const parts = [];
  if (lbl) parts.push('model ' + lbl);
  if (acc != null) parts.push('test accuracy ' + acc.toFixed(1) + '%');
  modelEl.textContent = parts.join(' · ') || 'model info unavailable';
}
fetch('/metadata', { headers: { Accept: 'application/json' } })
  .then((r) => (r.ok ? r.json() : null))
  .then((md) => { if (md && typeof md === 'object') meta = md; showModel(meta && meta.name, meta && meta.version); })
  .catch(() => { modelEl.textContent = 'model info unavailable'; });

fillPaper();
resetResult();
setState('idle');
})();
