"""Keyboard shortcuts for the Pairwise and Arena tabs: one `keydown` listener, added once at page load.

Pass `KEYBOARD_JS` as `js=` to `launch()` or `gr.mount_gradio_app()`. Each key clicks the button with
the matching `elem_id` (a real `.click()`, so it goes through the same event, `trigger_mode="once"` and
idempotency key as a mouse click). Keys are ignored while the focus is in a text field, a select or a
contentEditable element, with a modifier held, on auto-repeat, and while the button is hidden (another
tab) or disabled; a key may name several buttons (the Pairwise tab's and the Arena's) and clicks the first
one shown and enabled, so only the open tab's button reacts. The span picker handles its own G / B keys.
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
"""Key (lower case) -> elem_id of the Pairwise tab's button it clicks."""
ARENA_KEYS: dict[str, str | list[str]] = {
    "1": "arena-vote-a",
    "2": "arena-vote-b",
    "3": "arena-vote-tie",
    "4": "arena-vote-both-bad",
    "n": ["arena-next", "arena-new"],
}
"""Key (lower case) -> elem_id(s) of the Arena tab's buttons: the first one shown and enabled is clicked."""


def key_map(*maps: dict[str, str | list[str]]) -> dict[str, list[str]]:
    """Merge key maps into key -> every elem_id it may click, in order."""
    merged: dict[str, list[str]] = {}
    for mapping in maps:
        for key, ids in mapping.items():
            merged.setdefault(key, []).extend([ids] if isinstance(ids, str) else ids)
    return merged


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
    for (const id of KEYS[(e.key || '').toLowerCase()] || []) {
      const button = document.getElementById(id);
      if (!button || button.disabled || button.offsetParent === null) continue;
      e.preventDefault();
      button.click();
      return;
    }
  });
}""".replace("__KEYS__", json.dumps(key_map(VOTE_KEYS, ARENA_KEYS)))
