"""Errors of :mod:`hf_attrib.hub`: each says what went wrong and what to do."""

from __future__ import annotations

__all__ = [
    "HubAuthError",
    "HubConnectionError",
    "HubError",
    "HubIntegrityError",
    "HubNotFoundError",
    "HubPathError",
]


class HubError(Exception):
    """Base class of the Hub errors of hf_attrib."""


class HubNotFoundError(HubError, FileNotFoundError):
    """A repository, revision or file does not exist (or is not visible with this token)."""


class HubAuthError(HubError):
    """No token for an operation that writes to the Hub."""


class HubIntegrityError(HubError):
    """A file does not match the hash recorded in the repository's index, has no recorded
    hash, or the index itself is damaged (not JSON, not an hf-attrib index)."""


class HubPathError(HubError, ValueError):
    """An index names a file that is not a plain relative path inside its repo folder
    (absolute, ``..``, a Windows drive or backslash, or a symlink that leads outside)."""


class HubConnectionError(HubError, ConnectionError):
    """The Hub cannot be reached (network down, wrong endpoint, or offline mode without the
    files in the cache)."""
