"""The results files of the speed benchmarks: their names and the header each one starts with.

Every run writes ``results/<case>-<date>.md`` (and ``results/<case>-<date>.json`` when it has
raw data), ``<case>`` naming what was measured (``methods-mlp-digits``, ``projection``) and
``<date>`` the day of the run (``2026-11-29``). A run of the same case on a later day writes a
new file (the older one goes once nothing cites it); on the same day it replaces the file. The
header states the date, the machine (CPU model, cores) and the library versions, so that no
table is read without them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

# Versions named in every header; dattri only where it is installed (the comparison runs).
_PACKAGES = ("torch", "transformers", "hf-attrib", "dattri")


@dataclass
class Result:
    """One results file: what a benchmark hands the runner to write.

    Attributes:
        case: what was measured, the file name's first part (``methods-mlp-digits``).
        title: the Markdown title.
        body: the Markdown below the header (settings, tables, notes).
        payload: raw data for the ``.json`` file beside it (``None``: no JSON).
        date: when the run started (the file's date); ``None``: when the runner started it.
    """

    case: str
    title: str
    body: str
    payload: dict[str, Any] | None = None
    date: dt.datetime | None = None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The machine and the versions a result depends on, as recorded in every header."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    info: dict[str, Any] = {"cpu": cpu_model(), "cores": os.cpu_count(),
                            "usable_cores": usable, "platform": platform.platform(),
                            "python": sys.version.split()[0]}
    for package in _PACKAGES:
        with contextlib.suppress(PackageNotFoundError):
            info[package] = version(package)
    with contextlib.suppress(OSError):
        info["loadavg_1min"] = round(os.getloadavg()[0], 2)
    return info


def results_path(out: Path, case: str, when: dt.datetime | dt.date, suffix: str = ".md"
                 ) -> Path:
    """``out/<case>-<YYYY-MM-DD><suffix>``."""
    return Path(out) / f"{case}-{when:%Y-%m-%d}{suffix}"


def header(title: str, started: dt.datetime, info: dict[str, Any], command: str) -> str:
    """The lines every results file starts with: title, date, machine, versions, command."""
    cores = f"{info['cores']} cores"
    if info.get("usable_cores") not in (None, info["cores"]):
        cores += f" ({info['usable_cores']} usable)"
    load = (f"; load average {info['loadavg_1min']} at the start"
            if "loadavg_1min" in info else "")
    versions = ", ".join(f"{name} {info[name]}" for name in ("python", *_PACKAGES)
                         if name in info)
    return "\n".join([
        f"# {title}",
        "",
        f"Date: {started.isoformat(timespec='seconds')}  ",
        f"Machine: {info['cpu']}, {cores}, {info['platform']}{load}  ",
        f"Versions: {versions}  ",
        f"Command: `{command}`",
        "",
    ])


def write_result(out: Path, result: Result, info: dict[str, Any] | None = None,
                 started: dt.datetime | None = None, command: str | None = None) -> Path:
    """Write ``result`` as ``out/<case>-<date>.md`` (+ ``.json``) with the standard header.

    Args:
        out: the results folder (created if missing).
        result: what the benchmark measured.
        info: ``machine()`` as taken when the run started (default: now).
        started: when the run started, for a result without its own ``date`` (default: now).
        command: the command line to record (default: this process's).

    Returns:
        The Markdown file's path.
    """
    command = command or " ".join([Path(sys.executable).as_posix(), *sys.argv])
    info = info or machine()
    date = result.date or started or dt.datetime.now()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = results_path(out, result.case, date)
    path.write_text(header(result.title, date, info, command) + "\n"
                    + result.body.strip("\n") + "\n")
    if result.payload is not None:
        payload = {"case": result.case, "date": date.isoformat(timespec="seconds"),
                   "command": command, "machine": info, **result.payload}
        path.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    return path
