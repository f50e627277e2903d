"""Errors a service raises for the user to read (the UI shows the message as is).

The subclasses carry the HTTP meaning the REST API and the server map them to, so a service
decides once what went wrong and every front end reports it the same way.
"""

from __future__ import annotations

from typing import Any


class ServiceError(ValueError):
    """A clear, specific problem with what the user asked for; nothing was written."""

    status_code = 400


class Unauthorized(ServiceError):
    """No valid session: nobody is logged in, or the account is unknown or deactivated."""

    status_code = 401


class Forbidden(ServiceError):
    """The logged-in user's role does not allow this action."""

    status_code = 403


class NotFound(ServiceError):
    """The record does not exist, or it is not visible to this user."""

    status_code = 404


class Conflict(ServiceError):
    """The request clashes with the stored state (a stale version, a reused idempotency key).

    `current` holds what is stored now, so a client can show or merge it.
    """

    status_code = 409

    def __init__(self, message: str, current: Any = None):
        super().__init__(message)
        self.current = current
