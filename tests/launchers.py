"""Two CPU processes on gloo, launched as users launch them (``torchrun``, ``accelerate``)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from hub_server import free_port

LAUNCHERS = {
    "torchrun": lambda port: ["torchrun", "--nproc_per_node", "2", "--master_port", str(port)],
    "accelerate": lambda port: ["accelerate", "launch", "--multi_gpu", "--num_processes", "2",
                                "--num_machines", "1", "--mixed_precision", "no",
                                "--dynamo_backend", "no", "--main_process_port", str(port)],
}


def launch_two(launcher: str, args: list[str], *, env: dict[str, str] | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``args`` (a script and its arguments, or ``-m module ...``) in two processes under
    ``launcher``, one thread each; skips the test when the launcher is not installed and
    fails it, with the processes' output tails, when they fail."""
    if shutil.which(launcher) is None:
        pytest.skip(f"{launcher} is not on PATH")
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([*LAUNCHERS[launcher](free_port()), *args], capture_output=True,
                          text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
