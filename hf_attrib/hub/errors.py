"""Errors of :mod:`hf_attrib.hub`: each says what went wrong and what to do."""

from __future__ import annotations

__all__ = ["HubAuthError", "HubError", "HubIntegrityError", "HubNotFoundError"]


class HubError(Exception):
    """Base class of the Hub errors of hf_attrib."""


class HubNotFoundError(HubError, FileNotFoundError):
    """A repository, revision or file does not exist (or is not visible with this token)."""


class HubAuthError(HubError):
    """No token for an operation that writes to the Hub."""


class HubIntegrityError(HubError):
    """A downloaded file does not match the hash recorded in the repository's index."""
