"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def local_hub(tmp_path_factory):
    """olah + a write front server on free ports (``tests/hub_server.py``); stopped after the
    module. ``local_hub.endpoint`` is the ``HF_ENDPOINT`` to use."""
    from hub_server import LocalHub

    hub = LocalHub(tmp_path_factory.mktemp("hub")).start()
    try:
        yield hub
    finally:
        hub.stop()
