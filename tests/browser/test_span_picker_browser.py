"""The span picker on its own, in a tiny Blocks: suggestions, trimming, overlap refusal, grapheme snapping,
code-point offsets past emoji, and a new value pushed by the server."""

from __future__ import annotations

import json

import pytest
from annotation_helpers import LABELS, drag_select
from playwright.sync_api import expect

pytestmark = pytest.mark.browser

PICKER_TEXT = (
    'Héllo 😀 wörld, cafe\u0301 au lait. ${1+1} <img src=x id="evil-img" onerror="window.__xss_img=1">'
)


@pytest.fixture
def picker_page(page):
    """A tiny Blocks with only the span picker, a Save button (spans as JSON) and a Next button."""
    import gradio as gr

    from studio.components.span_picker import SpanPicker, picker_value

    text = PICKER_TEXT
    first = picker_value(
        text,
        [],
        LABELS,
        [
            {"start": text.index("au"), "end": text.index("au") + 2, "polarity": "good", "score": 0.9},
            {"start": text.index("lait"), "end": text.index("lait") + 4, "polarity": "bad"},
        ],
    )
    with gr.Blocks() as demo:
        picker = SpanPicker(first, elem_id="picker")
        saved = gr.Textbox(elem_id="saved")
        gr.Button("Save", elem_id="save").click(lambda v: json.dumps(v["spans"]), picker, saved)
        gr.Button("Next", elem_id="next").click(
            lambda: picker_value("Zweiter Text 👍🏽 hier.", [], LABELS, []), None, picker
        )
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        page.goto(demo.local_url)
        yield page
    finally:
        demo.close()


def test_span_picker_on_its_own(picker_page):
    page = picker_page
    text_box = page.locator("#picker .sp-text")
    expect(text_box).to_have_text(PICKER_TEXT)  # template syntax and markup shown as typed
    assert page.evaluate("Object.keys(window).filter((k) => k.startsWith('__xss'))") == []
    assert page.locator("#evil-img").count() == 0
    # Suggestions are dashed, with accept / reject.
    expect(page.locator("#picker .sp-s-good")).to_have_text("au")
    expect(page.locator("#picker .sp-s-bad")).to_have_text("lait")
    page.locator("#picker .sp-suggestions .sp-row").first.locator(".sp-accept").click()
    page.locator("#picker .sp-suggestions .sp-reject").click()
    expect(page.locator("#picker .sp-suggestions .sp-row")).to_have_count(0)
    expect(page.locator("#picker .sp-good")).to_have_text("au")

    # A mouse selection with leading and trailing spaces is trimmed; G marks it good.
    drag_select(page, "#picker .sp-text", " wörld")
    page.keyboard.press("g")
    expect(page.locator("#picker .sp-good").first).to_have_text("wörld")
    # An overlapping selection is refused with a hint, nothing is added.
    drag_select(page, "#picker .sp-text", "örld, ca")
    page.keyboard.press("b")
    expect(page.locator("#picker .sp-hint")).to_contain_text("overlaps")
    expect(page.locator("#picker .sp-list .sp-row")).to_have_count(2)
    # A selection ending between "e" and its combining accent grows to the whole character.
    page.evaluate(
        """() => {
            const root = document.querySelector('#picker .sp-text');
            const walk = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
            let n;
            while ((n = walk.nextNode())) {
                const i = n.textContent.indexOf('cafe');
                if (i >= 0) { const r = document.createRange(); r.setStart(n, i); r.setEnd(n, i + 4);
                    const s = window.getSelection(); s.removeAllRanges(); s.addRange(r); return; }
            }
        }"""
    )
    page.locator("#picker .sp-label").select_option("tone")
    page.locator("#picker .sp-mark-bad").click()
    expect(page.locator("#picker .sp-bad")).to_have_text("cafe\u0301")

    page.locator("#save").click()
    expect(page.locator("#saved textarea")).not_to_have_value("")
    spans = json.loads(page.locator("#saved textarea").input_value())
    t = PICKER_TEXT
    assert spans == [
        {
            "start": t.index("wörld"),
            "end": t.index("wörld") + 5,
            "polarity": "good",
            "label": None,
            "comment": None,
        },
        {
            "start": t.index("cafe"),
            "end": t.index("cafe") + 5,
            "polarity": "bad",
            "label": "tone",
            "comment": None,
        },
        {
            "start": t.index("au"),
            "end": t.index("au") + 2,
            "polarity": "good",
            "label": None,
            "comment": None,
        },
    ]

    # A new value from the server replaces text and spans; marking works on it (offsets past an emoji).
    page.locator("#next").click()
    expect(text_box).to_have_text("Zweiter Text 👍🏽 hier.")
    expect(page.locator("#picker .sp-list .sp-row")).to_have_count(0)
    drag_select(page, "#picker .sp-text", "hier")
    page.locator("#picker .sp-mark-good").click()
    page.locator("#save").click()
    expect(page.locator("#saved textarea")).to_have_value(
        json.dumps([{"start": 16, "end": 20, "polarity": "good", "label": None, "comment": None}])
    )
