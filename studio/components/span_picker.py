"""SpanPicker: mark good and bad spans of a response with the mouse (a small custom component on gr.HTML).

Value (JSON, both ways):
    {"text": str,                       # the response being marked (display only: the server keeps its own copy)
     "spans": [SpanDict, ...],          # the annotator's spans
     "labels": [str, ...],              # the project's label set (the label select offers these)
     "suggestions": [SpanDict, ...]}    # model-suggested spans, shown dashed with accept / reject
    SpanDict = {"start": int, "end": int, "polarity": "good"|"bad", "label": str|None, "comment": str|None}
    Offsets are Unicode code points, half-open, as stored by the annotation service. The browser works in
    UTF-16 units; the component's JavaScript converts with `Array.from` (one element per code point).

Marking: select text with the mouse, then Good / Bad (or the keys G / B while the picker is visible and the
focus is not in a text field). A selection is trimmed of surrounding whitespace and widened to whole
grapheme clusters (`Intl.Segmenter`), and one that overlaps an existing span is refused with a hint, as
the service would refuse it. Spans are listed under the text: polarity, label and comment can be changed,
a span deleted; suggestions can be accepted (they become spans) or rejected.

Safety: `html_template` and `css_template` are static. Gradio runs a template through Handlebars and then
evaluates the result as a JavaScript template literal, so model text placed in a template could run
`${...}` code. All text reaches the page only through `textContent` / `createElement` in `js_on_load`.
The value sent back is attacker-controlled like any request: callers read only `spans` from it, and the
annotation service validates every offset, polarity and label against its own copy of the text.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from studio.spans import MAX_SPANS

TEMPLATE = """
<div class="sp-root">
  <div class="sp-toolbar">
    <button type="button" class="sp-mark sp-mark-good" data-polarity="good">Good [G]</button>
    <button type="button" class="sp-mark sp-mark-bad" data-polarity="bad">Bad [B]</button>
    <label class="sp-field">Label <select class="sp-label"></select></label>
    <input class="sp-comment" type="text" maxlength="1000" placeholder="Comment (optional)" aria-label="Comment">
  </div>
  <div class="sp-text" aria-label="Response to mark"></div>
  <div class="sp-hint" aria-live="polite"></div>
  <div class="sp-list"></div>
  <div class="sp-suggestions"></div>
</div>
"""

CSS = """
.sp-root { display: flex; flex-direction: column; gap: 8px; }
.sp-toolbar { display: flex; flex-wrap: wrap; gap: 8px; align-items: center; }
.sp-mark, .sp-row button { border: 1px solid #bbb; border-radius: 6px; padding: 4px 10px; cursor: pointer; background: #fff; }
.sp-mark-good { border-color: #2e7d32; color: #1b5e20; }
.sp-mark-bad { border-color: #c62828; color: #b71c1c; }
.sp-comment { flex: 1; min-width: 160px; padding: 4px 6px; border: 1px solid #bbb; border-radius: 6px; }
.sp-text { white-space: pre-wrap; word-break: break-word; line-height: 1.7; padding: 10px 12px; border: 1px solid #ddd; border-radius: 8px; min-height: 3em; max-height: 28em; overflow-y: auto; user-select: text; cursor: text; }
.sp-good { background: rgba(46, 125, 50, 0.25); border-bottom: 2px solid #2e7d32; }
.sp-bad { background: rgba(198, 40, 40, 0.22); border-bottom: 2px solid #c62828; }
.sp-mixed { background: rgba(245, 124, 0, 0.3); border-bottom: 2px solid #ef6c00; }
.sp-s-good { text-decoration: underline dashed #2e7d32 2px; text-underline-offset: 4px; }
.sp-s-bad { text-decoration: underline dashed #c62828 2px; text-underline-offset: 4px; }
.sp-hint { font-size: 0.9em; opacity: 0.8; min-height: 1.2em; }
.sp-list, .sp-suggestions { display: flex; flex-direction: column; gap: 4px; }
.sp-row { display: flex; flex-wrap: wrap; gap: 6px; align-items: center; padding: 4px 6px; border-left: 4px solid #999; border-radius: 4px; }
.sp-row-good { border-left-color: #2e7d32; }
.sp-row-bad { border-left-color: #c62828; }
.sp-row-suggestion { border-left-style: dashed; }
.sp-quote { flex: 1 1 240px; font-style: italic; white-space: pre-wrap; word-break: break-word; }
.sp-offsets { font-size: 0.8em; opacity: 0.7; }
.sp-row input { padding: 2px 6px; border: 1px solid #bbb; border-radius: 4px; }
.sp-title { font-weight: 600; margin-top: 4px; }
"""

JS = r"""
const textEl = element.querySelector('.sp-text');
const listEl = element.querySelector('.sp-list');
const suggEl = element.querySelector('.sp-suggestions');
const labelSel = element.querySelector('.sp-label');
const commentIn = element.querySelector('.sp-comment');
const hint = element.querySelector('.sp-hint');
let state = {text: '', spans: [], labels: [], suggestions: []};
let cps = [];
let pending = null;

function str(x) { return typeof x === 'string' && x.length ? x : null; }
function normSpan(s) {
  if (!s || typeof s !== 'object') return null;
  const out = {start: Math.trunc(Number(s.start)) || 0, end: Math.trunc(Number(s.end)) || 0,
    polarity: s.polarity === 'good' ? 'good' : 'bad', label: str(s.label), comment: str(s.comment)};
  if (typeof s.score === 'number') out.score = s.score;
  return out;
}
function clean(v) {
  const o = v && typeof v === 'object' ? v : {};
  const arr = (x) => Array.isArray(x) ? x : [];
  return {
    text: typeof o.text === 'string' ? o.text : '',
    spans: arr(o.spans).map(normSpan).filter(Boolean),
    labels: arr(o.labels).filter((l) => typeof l === 'string'),
    suggestions: arr(o.suggestions).map(normSpan).filter(Boolean),
  };
}
function make(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
function option(value, text) { const o = make('option', '', text); o.value = value; return o; }
function labelSelect(current) {
  const sel = make('select', 'sp-row-label');
  sel.setAttribute('aria-label', 'Label');
  sel.appendChild(option('', '(no label)'));
  const names = state.labels.slice();
  if (current && !names.includes(current)) names.push(current);
  for (const l of names) sel.appendChild(option(l, l));
  sel.value = current || '';
  return sel;
}
function excerpt(s) {
  const piece = cps.slice(s.start, s.end);
  return piece.length > 80 ? piece.slice(0, 79).join('') + '\u2026' : piece.join('');
}
function sorted(list) { return list.sort((a, b) => a.start - b.start || a.end - b.end); }
function commit() {
  const copy = (s) => Object.assign({}, s);
  props.value = {text: state.text, spans: state.spans.map(copy), labels: state.labels.slice(),
    suggestions: state.suggestions.map(copy)};
}

function renderText() {
  textEl.replaceChildren();
  const n = cps.length;
  const cuts = new Set([0, n]);
  const all = state.spans.map((s, i) => ({s, i, kind: 'span'}))
    .concat(state.suggestions.map((s, i) => ({s, i, kind: 'suggestion'})))
    .filter(({s}) => s.start >= 0 && s.end <= n && s.start < s.end);
  for (const {s} of all) { cuts.add(s.start); cuts.add(s.end); }
  const points = Array.from(cuts).sort((a, b) => a - b);
  for (let k = 0; k + 1 < points.length; k++) {
    const a = points[k], b = points[k + 1];
    const seg = make('span', 'sp-seg', cps.slice(a, b).join(''));
    seg.dataset.cp = String(a);
    const cover = all.filter(({s}) => s.start <= a && s.end >= b);
    const pols = new Set(cover.filter((c) => c.kind === 'span').map((c) => c.s.polarity));
    if (pols.size > 1) seg.classList.add('sp-mixed');
    else if (pols.size === 1) seg.classList.add(pols.has('good') ? 'sp-good' : 'sp-bad');
    for (const c of cover.filter((c) => c.kind === 'suggestion')) seg.classList.add('sp-s-' + c.s.polarity);
    const notes = cover.filter((c) => c.kind === 'span')
      .map((c) => [c.s.polarity, c.s.label, c.s.comment].filter(Boolean).join(': '));
    if (notes.length) seg.title = notes.join('\n');
    textEl.appendChild(seg);
  }
}

function renderList() {
  listEl.replaceChildren();
  if (!state.spans.length) {
    listEl.appendChild(make('div', 'sp-empty', 'No spans yet: select text, then Good [G] or Bad [B].'));
    return;
  }
  listEl.appendChild(make('div', 'sp-title', 'Your spans'));
  state.spans.forEach((s, i) => {
    const row = make('div', 'sp-row sp-row-' + s.polarity);
    row.dataset.index = String(i);
    const pol = make('select', 'sp-row-polarity');
    pol.setAttribute('aria-label', 'Polarity');
    pol.appendChild(option('good', 'good'));
    pol.appendChild(option('bad', 'bad'));
    pol.value = s.polarity;
    pol.addEventListener('change', () => { s.polarity = pol.value; render(); commit(); });
    const lab = labelSelect(s.label);
    lab.addEventListener('change', () => { s.label = lab.value || null; renderText(); commit(); });
    const com = make('input', 'sp-row-comment');
    com.type = 'text';
    com.maxLength = 1000;
    com.placeholder = 'comment';
    com.setAttribute('aria-label', 'Comment');
    com.value = s.comment || '';
    com.addEventListener('change', () => { s.comment = com.value.trim() || null; renderText(); commit(); });
    const del = make('button', 'sp-delete', 'Delete');
    del.type = 'button';
    del.addEventListener('click', () => { state.spans.splice(i, 1); render(); commit(); });
    row.append(make('span', 'sp-quote', excerpt(s)), make('span', 'sp-offsets', s.start + '\u2013' + s.end),
      pol, lab, com, del);
    listEl.appendChild(row);
  });
}

function renderSuggestions() {
  suggEl.replaceChildren();
  if (!state.suggestions.length) return;
  suggEl.appendChild(make('div', 'sp-title', 'Suggested by a model (dashed)'));
  state.suggestions.forEach((s, i) => {
    const row = make('div', 'sp-row sp-row-suggestion sp-row-' + s.polarity);
    row.dataset.index = String(i);
    const score = typeof s.score === 'number' ? ' (' + s.score.toFixed(2) + ')' : '';
    const accept = make('button', 'sp-accept', 'Accept');
    accept.type = 'button';
    accept.addEventListener('click', () => {
      if (overlapping(s)) {
        hint.textContent = 'That suggestion overlaps a span you already marked.';
        return;
      }
      state.suggestions.splice(i, 1);
      state.spans.push({start: s.start, end: s.end, polarity: s.polarity, label: s.label, comment: s.comment});
      sorted(state.spans);
      render(); commit();
    });
    const reject = make('button', 'sp-reject', 'Reject');
    reject.type = 'button';
    reject.addEventListener('click', () => { state.suggestions.splice(i, 1); render(); commit(); });
    row.append(make('span', 'sp-quote', excerpt(s)), make('span', 'sp-offsets', s.polarity + score),
      accept, reject);
    suggEl.appendChild(row);
  });
}

function renderLabels() {
  const keep = labelSel.value;
  labelSel.replaceChildren(option('', '(no label)'));
  for (const l of state.labels) labelSel.appendChild(option(l, l));
  labelSel.value = state.labels.includes(keep) ? keep : '';
}

function render() { renderText(); renderList(); renderSuggestions(); }

// Grapheme-cluster starts as code-point offsets: a span never splits "é" (e + U+0301) or an emoji sequence.
let bounds = [];
function graphemeBounds(text) {
  const out = [];
  if (typeof Intl === 'undefined' || !Intl.Segmenter) {
    for (let i = 0; i <= cps.length; i++) out.push(i);
    return out;
  }
  let cp = 0;
  for (const g of new Intl.Segmenter(undefined, {granularity: 'grapheme'}).segment(text)) {
    out.push(cp);
    cp += Array.from(g.segment).length;
  }
  out.push(cp);
  return out;
}
function snap(sel) {
  let start = 0, end = cps.length;
  for (const b of bounds) { if (b <= sel.start) start = b; }
  for (let k = bounds.length - 1; k >= 0; k--) { if (bounds[k] >= sel.end) end = bounds[k]; }
  return {start, end};
}
function overlapping(sel) {
  return state.spans.find((s) => s.start < sel.end && sel.start < s.end);
}

function load(v) {
  state = clean(v);
  sorted(state.spans);
  cps = Array.from(state.text);
  bounds = graphemeBounds(state.text);
  pending = null;
  renderLabels();
  render();
  hint.textContent = cps.length ? 'Select text with the mouse, then Good [G] or Bad [B].' : 'Nothing to mark.';
}

// Offsets: a DOM position (node, UTF-16 offset) -> a code-point offset into the text.
function cpAt(node, off) {
  if (node === textEl) {
    const kids = textEl.childNodes;
    return off >= kids.length ? cps.length : Number(kids[off].dataset.cp);
  }
  const host = node.nodeType === Node.TEXT_NODE ? node.parentElement : node;
  const seg = host && host.closest('.sp-seg');
  if (!seg || !textEl.contains(seg)) return null;
  const base = Number(seg.dataset.cp);
  if (node.nodeType === Node.TEXT_NODE) return base + Array.from(node.textContent.slice(0, off)).length;
  return off === 0 ? base : base + Array.from(seg.textContent).length;
}
function currentSelection() {
  const sel = window.getSelection();
  if (!sel || sel.rangeCount === 0 || sel.isCollapsed) return null;
  const r = sel.getRangeAt(0);
  if (!r.intersectsNode(textEl)) return null;
  let start = textEl.contains(r.startContainer) ? cpAt(r.startContainer, r.startOffset) : 0;
  let end = textEl.contains(r.endContainer) ? cpAt(r.endContainer, r.endOffset) : cps.length;
  if (start === null || end === null) return null;
  while (start < end && /\s/u.test(cps[start])) start++;
  while (end > start && /\s/u.test(cps[end - 1])) end--;
  return start < end ? snap({start, end}) : null;
}
function noteSelection() {
  const sel = currentSelection();
  if (!sel) return;
  pending = sel;
  hint.textContent = 'Selected ' + (sel.end - sel.start) + ' character(s): Good [G] or Bad [B]?';
}

function mark(polarity) {
  const sel = currentSelection() || pending;
  if (!sel) { hint.textContent = 'Select some text in the response first.'; return; }
  if (overlapping(sel)) {
    hint.textContent = 'That overlaps a span you already marked: change or delete that one instead.';
    return;
  }
  state.spans.push({start: sel.start, end: sel.end, polarity, label: labelSel.value || null,
    comment: commentIn.value.trim() || null});
  sorted(state.spans);
  pending = null;
  commentIn.value = '';
  labelSel.value = '';
  const s = window.getSelection();
  if (s) s.removeAllRanges();
  render();
  commit();
  hint.textContent = 'Marked ' + (sel.end - sel.start) + ' character(s) ' + polarity + '.';
}

for (const btn of element.querySelectorAll('.sp-mark')) {
  btn.addEventListener('mousedown', (e) => e.preventDefault());  // keep the text selection
  btn.addEventListener('click', () => mark(btn.dataset.polarity));
}
textEl.addEventListener('mousedown', () => { pending = null; });
textEl.addEventListener('mouseup', noteSelection);
textEl.addEventListener('keyup', noteSelection);
document.addEventListener('selectionchange', noteSelection);

function typing(el) {
  if (!el) return false;
  if (el.isContentEditable || el.tagName === 'TEXTAREA' || el.tagName === 'SELECT') return true;
  return el.tagName === 'INPUT' && !['radio', 'checkbox', 'button', 'submit'].includes(el.type);
}
function onKey(e) {
  if (!element.isConnected) {
    document.removeEventListener('keydown', onKey);
    document.removeEventListener('selectionchange', noteSelection);
    return;
  }
  if (e.ctrlKey || e.metaKey || e.altKey || e.repeat || element.offsetParent === null) return;
  if (typing(e.target) || typing(document.activeElement) || !cps.length) return;
  const key = e.key.toLowerCase();
  if (key !== 'g' && key !== 'b') return;
  e.preventDefault();
  mark(key === 'g' ? 'good' : 'bad');
}
document.addEventListener('keydown', onKey);

watch('value', () => load(props.value));
load(props.value);
"""


def picker_value(
    text: str,
    spans: list[dict] | None = None,
    labels: list[str] | None = None,
    suggestions: list[dict] | None = None,
) -> dict[str, Any]:
    """The component's value for one response: text, the annotator's spans, the label set, suggestions."""
    return {
        "text": text,
        "spans": [dict(s) for s in spans or []],
        "labels": list(labels or []),
        "suggestions": [dict(s) for s in suggestions or []],
    }


def spans_of(payload: Any) -> list[dict[str, Any]]:
    """The spans a client sent back, reduced to the five SpanDict keys (types are checked by the service).

    Raises ValueError when the payload is not the component's shape or holds more than MAX_SPANS spans.
    """
    if payload is None:
        return []
    if not isinstance(payload, dict) or not isinstance(payload.get("spans", []), list):
        raise ValueError("the span picker sent a value of the wrong shape")
    spans = payload.get("spans", [])
    if len(spans) > MAX_SPANS:
        raise ValueError(f"at most {MAX_SPANS} spans per response")
    out = []
    for i, s in enumerate(spans):
        if not isinstance(s, dict):
            raise ValueError(f"span {i}: not an object")
        out.append({k: s.get(k) for k in ("start", "end", "polarity", "label", "comment")})
    return out


class SpanPicker(gr.HTML):
    """Select text with the mouse and mark it good or bad, with an optional label and comment.

    The value is described in the module docstring. Edits update the value in the browser (and fire
    `change`); a Save button that takes the picker as an input reads the current spans.
    """

    def __init__(self, value: dict | None = None, **kwargs: Any):
        super().__init__(
            value=value,
            html_template=TEMPLATE,
            css_template=CSS,
            js_on_load=JS,
            apply_default_css=False,
            **kwargs,
        )

    def preprocess(self, payload: Any) -> dict | None:  # type: ignore[override]
        """The client's value with `spans` reduced to SpanDict keys; raises gr.Error on a wrong shape."""
        if payload is None:
            return None
        try:
            spans = spans_of(payload)
        except ValueError as exc:
            raise gr.Error(str(exc)) from None
        return {**payload, "spans": spans}

    def postprocess(self, value: dict | None) -> dict | None:  # type: ignore[override]
        return value

    def api_info(self) -> dict[str, Any]:
        return {"type": "object"}

    def example_payload(self) -> Any:
        return picker_value("An example response.", [{"start": 3, "end": 10, "polarity": "good"}])

    def example_value(self) -> Any:
        return self.example_payload()
