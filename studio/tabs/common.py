"""Helpers shared by the tabs: the shared context and error handling for callbacks."""

from __future__ import annotations

import functools
import html
from dataclasses import dataclass

import gradio as gr

from studio.services import ServiceError, Services


@dataclass
class Shared:
    """Components every tab reads: the services and the per-session current project."""

    services: Services
    project_id: gr.State
    project_select: gr.Dropdown


_PUNCTUATION = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def inert(text: object) -> str:
    """User or model text made safe to place inside Markdown: it shows exactly as typed.

    Every ASCII punctuation character becomes a numeric character reference. CommonMark treats
    references as literal text, never as markup, so no HTML element, emphasis, link or autolink
    (`http://...`, `www.`, e-mail) can come out of a name such as `<img onerror=...>` or `![x](http://...)`.
    """
    return "".join(f"&#{ord(c)};" if c in _PUNCTUATION else c for c in str(text))


def user_errors(fn):
    """Show a ServiceError's message in the page (gr.Error) instead of a generic failure.

    The message may quote what the user typed (a name, a model reference), so it is made inert.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ServiceError as exc:
            raise gr.Error(html.escape(str(exc))) from None

    return wrapper


def require_project(project_id: int | None) -> int:
    if project_id is None:
        raise gr.Error("Choose or create a project first (Projects tab).")
    return int(project_id)


def project_choices(services: Services) -> list[tuple[str, int]]:
    return [(p.name, p.id) for p in services.projects.list()]
