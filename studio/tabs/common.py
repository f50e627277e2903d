"""Helpers shared by the tabs: the shared context, role checks and error handling for callbacks."""

from __future__ import annotations

import functools
import html
import inspect
import re
from dataclasses import dataclass, field

import gradio as gr

from storage.models import User
from studio.services import ServiceError, Services
from studio.services.errors import Forbidden, Unauthorized

ADMIN, ANNOTATOR, RATER = "admin", "annotator", "rater"

# Concurrency (R-DB-04). Every event says where it runs: Gradio gives each event without a
# `concurrency_id` its own queue slots, and their sum would exceed the database pool.
DB_CONCURRENCY = 16
"""Queue slots shared by all events that touch the database (one group, `concurrency_id="db"`)."""
DB_EVENTS = {"concurrency_id": "db", "concurrency_limit": DB_CONCURRENCY}
"""`**DB_EVENTS` on an event that reads or writes the database (most of them)."""
UI_ONLY = {"queue": False, "concurrency_id": "ui"}
"""`**UI_ONLY` on an event that never touches the database: it runs outside the queue."""
HEAVY_LIMITS = {"model": 1, "datasets": 2}
"""Other queue groups: generation (`generate`), snapshot export/download/import (`datasets`)."""
REST_HEADROOM = 10
"""Pool connections (of `storage.db.POOL_CAPACITY`) left for REST requests and background work:
the queue groups' limits add up to at most the rest (tests/studio/test_ui_helpers.py checks)."""
_TAB_ID = re.compile(r"[a-z0-9_-]{1,40}")


@dataclass
class Shared:
    """Components every tab reads: the services and the per-session current project."""

    services: Services
    project_id: gr.State
    project_select: gr.Dropdown
    tabs: list[tuple[gr.Tab, str, tuple[str, ...]]] = field(default_factory=list)
    """Every tab made with `tab()`: (tab, id, roles that see it); shown or hidden on page load."""

    def tab(self, label: str, tab_id: str, *roles: str) -> gr.Tab:
        """A tab seen only by `roles` (an admin sees every tab): `with shared.tab("Import", "import", ADMIN):`.

        Hiding a tab is a convenience, not protection: every handler checks the role itself.
        """
        if not _TAB_ID.fullmatch(tab_id):
            raise ValueError(f"tab id {tab_id!r}: use lower-case letters, digits, - and _")
        tab = gr.Tab(label, id=tab_id, elem_id=f"tab-{tab_id}")
        self.tabs.append((tab, tab_id, roles))
        return tab


def signed_in(services: Services, request: gr.Request | None, *roles: str) -> User:
    """The signed-in user, checked in the database against `roles` (none: any active user).

    Identity comes only from the server-side session (`request.username`), never from a form field.
    Unauthorized/Forbidden become a gr.Error (the handler stops; nothing is written).
    """
    username = getattr(request, "username", None) if request is not None else None
    try:
        return services.users.require(username, *roles)
    except (Unauthorized, Forbidden) as exc:
        raise gr.Error(html.escape(str(exc))) from None


def requires(shared: Shared | Services, *roles: str):
    """Decorator for a Gradio callback: check the signed-in user's role before running it.

    The callback gets a `request: gr.Request` parameter added (Gradio fills it in), unless it has
    one already. A refused call raises gr.Error before the callback runs.

        @user_errors
        @requires(shared, ADMIN)
        def create(name_v, desc_v): ...
    """
    services = shared.services if isinstance(shared, Shared) else shared

    def decorate(fn):
        sig = inspect.signature(fn)
        if "request" in sig.parameters:

            @functools.wraps(fn)
            def passthrough(*args, **kwargs):
                bound = sig.bind(*args, **kwargs)
                signed_in(services, bound.arguments.get("request"), *roles)
                return fn(*args, **kwargs)

            return passthrough
        positional = (inspect.Parameter.POSITIONAL_OR_KEYWORD,)
        if any(p.kind not in positional for p in sig.parameters.values()):
            raise TypeError(f"@requires needs plain parameters in {fn.__name__}; add `request: gr.Request`")
        request = inspect.Parameter(
            "request", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=gr.Request
        )
        new_sig = sig.replace(parameters=[*sig.parameters.values(), request])

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            arguments = new_sig.bind(*args, **kwargs).arguments
            signed_in(services, arguments.pop("request", None), *roles)
            return fn(**arguments)

        wrapper.__signature__ = new_sig
        wrapper.__annotations__ = {**getattr(fn, "__annotations__", {}), "request": gr.Request}
        return wrapper

    return decorate


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


def session_line(user: User, hidden_tabs: tuple[str, ...] | list[str] = ()) -> str:
    """'Signed in as <name> (<role>) · Log out' as our own HTML, the name escaped.

    Gradio 6.31 hides a tab's panel on `gr.update(visible=False)` but not its button, so the
    buttons of `hidden_tabs` (ids checked by `Shared.tab`) are hidden by a style rule here.
    """
    rules = ", ".join(f"button[role=tab][data-tab-id='{tab_id}']" for tab_id in hidden_tabs)
    style = f"<style>{rules} {{ display: none !important; }}</style>" if rules else ""
    return (
        f"{style}<div id='session-text'>Signed in as <b>{html.escape(user.username)}</b> "
        f"({html.escape(str(user.role))}) · <a href='/logout' id='logout-link'>Log out</a></div>"
    )


def wire_session(demo: gr.Blocks, shared: Shared, line: gr.HTML, tabs: gr.Tabs) -> None:
    """On page load: show who is signed in, show only the tabs their role may use, select the first.

    Call once, after every tab has been made with `shared.tab(...)`.
    """
    services = shared.services

    def on_load(request: gr.Request):
        user = signed_in(services, request)
        role = str(user.role)
        visible = [role == ADMIN or not roles or role in roles for _tab, _id, roles in shared.tabs]
        first = next((tab_id for (_t, tab_id, _r), v in zip(shared.tabs, visible, strict=True) if v), None)
        hidden = [tab_id for (_t, tab_id, _r), v in zip(shared.tabs, visible, strict=True) if not v]
        return (
            session_line(user, hidden),
            gr.update(selected=first) if first else gr.skip(),
            *[gr.update(visible=v) for v in visible],
        )

    demo.load(on_load, None, [line, tabs, *[tab for tab, _id, _roles in shared.tabs]], **DB_EVENTS)
