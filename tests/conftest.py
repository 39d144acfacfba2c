"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

MNIST_DIR_ENV = "HF_ATTRIB_MNIST_DIR"
MNIST_REPO = "ylecun/mnist"


def find_mnist_dir() -> Path | None:
    """The offline MNIST copy (parquet in the Hub's layout), or ``None``.

    ``$HF_ATTRIB_MNIST_DIR`` when set (and then only it); else ``<repo>/../shared/data/mnist``
    (where the issue puts it), else ``/work/shared/data/mnist`` (CI clones the repo elsewhere).
    """
    if os.environ.get(MNIST_DIR_ENV):
        candidates = [Path(os.environ[MNIST_DIR_ENV])]
    else:
        repo = Path(__file__).resolve().parents[1]
        candidates = [repo.parent / "shared" / "data" / "mnist", Path("/work/shared/data/mnist")]
    return next((c for c in candidates if (c / "train-00000-of-00001.parquet").is_file()), None)


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


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The offline MNIST folder (see :func:`find_mnist_dir`); skips the test without one."""
    folder = find_mnist_dir()
    if folder is None:
        pytest.skip(f"no offline MNIST copy: set {MNIST_DIR_ENV} to a folder holding "
                    "train-00000-of-00001.parquet (e.g. ../shared/data/mnist)")
    return folder


@pytest.fixture(scope="module")
def mnist_hub(local_hub, mnist_dir):
    """``local_hub`` serving the offline MNIST folder as the dataset repo ``ylecun/mnist``
    (every file of the folder, committed as is); ``HF_ENDPOINT=mnist_hub.endpoint``."""
    if local_hub.create_repo("dataset", MNIST_REPO):
        files = {p.name: p.read_bytes() for p in sorted(mnist_dir.iterdir()) if p.is_file()}
        local_hub.commit("dataset", MNIST_REPO, "main", {"summary": f"MNIST from {mnist_dir}"},
                         files, [], [])
    return local_hub
