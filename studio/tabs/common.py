"""Helpers shared by the tabs: the shared context and error handling for callbacks."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import gradio as gr

from studio.services import ServiceError, Services


@dataclass
class Shared:
    """Components every tab reads: the services and the per-session current project."""

    services: Services
    project_id: gr.State
    project_select: gr.Dropdown


def user_errors(fn):
    """Show a ServiceError's message in the page (gr.Error) instead of a generic failure."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ServiceError as exc:
            raise gr.Error(str(exc)) from None

    return wrapper


def require_project(project_id: int | None) -> int:
    if project_id is None:
        raise gr.Error("Choose or create a project first (Projects tab).")
    return int(project_id)


def project_choices(services: Services) -> list[tuple[str, int]]:
    return [(p.name, p.id) for p in services.projects.list()]
