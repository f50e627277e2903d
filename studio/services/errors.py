"""Errors a service raises for the user to read (the UI shows the message as is)."""


class ServiceError(ValueError):
    """A clear, specific problem with what the user asked for; nothing was written."""
