"""Keyboard shortcuts for the Pairwise tab: one `keydown` listener, added once at page load.

Pass `KEYBOARD_JS` as `js=` to `launch()` or `gr.mount_gradio_app()`. Each key clicks the button with
the matching `elem_id` (a real `.click()`, so it goes through the same event, `trigger_mode="once"` and
idempotency key as a mouse click). Keys are ignored while the focus is in a text field, a select or a
contentEditable element, with a modifier held, on auto-repeat, and while the button is hidden (another
tab) or disabled. The span picker handles its own G / B keys.
"""

from __future__ import annotations

import json

VOTE_KEYS: dict[str, str] = {
    "1": "vote-a",
    "2": "vote-b",
    "3": "vote-tie",
    "4": "vote-both-bad",
    "s": "vote-skip",
}
"""Key (lower case) -> elem_id of the button it clicks."""

KEYBOARD_JS = """() => {
  if (window.__studioKeys) return;
  window.__studioKeys = true;
  const KEYS = __KEYS__;
  const typing = (el) => {
    if (!el) return false;
    if (el.isContentEditable || el.tagName === 'TEXTAREA' || el.tagName === 'SELECT') return true;
    return el.tagName === 'INPUT' && !['radio', 'checkbox', 'button', 'submit'].includes(el.type);
  };
  document.addEventListener('keydown', (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
    if (typing(e.target) || typing(document.activeElement)) return;
    const id = KEYS[(e.key || '').toLowerCase()];
    if (!id) return;
    const button = document.getElementById(id);
    if (!button || button.disabled || button.offsetParent === null) return;
    e.preventDefault();
    button.click();
  });
}""".replace("__KEYS__", json.dumps(VOTE_KEYS))
