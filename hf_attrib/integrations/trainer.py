"""Trainer checkpoints as a TracInCP trajectory.

A ``transformers.Trainer`` run leaves ``output_dir/checkpoint-<step>/`` folders. TracInCP
(``TracInAttributor``) sums, over those checkpoints ``c``, ``eta_c`` times a gradient inner
product, where ``eta_c`` is the learning rate of the optimiser step that produced checkpoint
``c``. ``trainer_checkpoints`` lists the folders in step order and finds ``eta_c``:

1. from ``hf_attrib_tracin.json`` in each checkpoint folder, written by
   ``TracInCheckpointCallback`` during training (exact: the rate the optimiser applied);
2. else from the ``log_history`` of ``trainer_state.json`` (exact when a log entry exists at
   the checkpoint's step, e.g. with ``logging_steps=1``; otherwise the nearest earlier logged
   rate, with a warning).

With ``weights="interval"`` the step size of checkpoint ``c`` is instead the sum of the rates
of every step since the previous checkpoint (the "learning-rate mass" the checkpoint stands
for), which matters when checkpoints are unevenly spaced.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

__all__ = [
    "CALLBACK_FILE",
    "TracInCheckpointCallback",
    "TrainerCheckpoints",
    "checkpoint_folders",
    "is_trainer_output_dir",
    "trainer_checkpoints",
]

CALLBACK_FILE = "hf_attrib_tracin.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_folders(output_dir: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of each ``checkpoint-<step>`` sub-folder of a Trainer ``output_dir``,
    in step order."""
    found = []
    for child in output_dir.iterdir():
        match = _CHECKPOINT.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def is_trainer_output_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding ``checkpoint-<step>`` sub-folders."""
    path = Path(path)
    return path.is_dir() and bool(checkpoint_folders(path))


@dataclass
class TrainerCheckpoints:
    """The checkpoints of a Trainer run, in step order.

    Attributes:
        paths: the ``checkpoint-<step>`` folders.
        steps: their global steps.
        learning_rates: the rate applied at each checkpoint's step (``None`` where unknown).
        interval_sums: the sum of the rates applied since the previous checkpoint.
        exact: every rate was recorded exactly (callback file or a log entry at that step).
        weights: the step sizes for ``TracInAttributor(weight_list=...)`` (``None``: unknown).
    """

    paths: list[Path]
    steps: list[int]
    learning_rates: list[float | None]
    interval_sums: list[float | None]
    exact: bool
    weights: list[float] | None = field(default=None)


def _log_history(folders: list[tuple[int, Path]], output_dir: Path) -> list[dict[str, Any]]:
    """The longest ``log_history`` among the run's ``trainer_state.json`` files."""
    best: list[dict[str, Any]] = []
    for path in [output_dir / "trainer_state.json"] + [f / "trainer_state.json"
                                                        for _, f in folders]:
        if path.exists():
            history = json.loads(path.read_text()).get("log_history", [])
            if len(history) > len(best):
                best = history
    return best


def trainer_checkpoints(output_dir: str | os.PathLike, weights: str = "lr"
                        ) -> TrainerCheckpoints:
    """The ``checkpoint-*`` folders of a Trainer ``output_dir`` and their TracInCP step sizes.

    Args:
        output_dir: the Trainer's ``args.output_dir``.
        weights: ``"lr"`` (the learning rate at each checkpoint's step, as in TracInCP) or
            ``"interval"`` (the sum of the learning rates since the previous checkpoint).
    """
    if weights not in ("lr", "interval"):
        raise ValueError(f"weights must be 'lr' or 'interval', got {weights!r}.")
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise FileNotFoundError(f"Trainer output_dir {output_dir} does not exist.")
    folders = checkpoint_folders(output_dir)
    if not folders:
        raise ValueError(
            f"{output_dir} has no checkpoint-<step> folders; train with save_strategy='steps' "
            "(and save_steps) or 'epoch' so that the Trainer saves checkpoints there."
        )
    history = [h for h in _log_history(folders, output_dir) if "learning_rate" in h]
    logged = {int(h["step"]): float(h["learning_rate"]) for h in history}
    rates: list[float | None] = []
    sums: list[float | None] = []
    exact = True
    approximate: list[int] = []
    previous = 0
    for step, folder in folders:
        record_path = folder / CALLBACK_FILE
        if record_path.exists():
            record = json.loads(record_path.read_text())
            rates.append(float(record["learning_rate"]))
            sums.append(float(record["learning_rate_sum"]))
        elif step in logged:
            rates.append(logged[step])
            interval = [logged.get(s) for s in range(previous + 1, step + 1)]
            if all(v is not None for v in interval):
                sums.append(float(sum(interval)))  # type: ignore[arg-type]
            else:
                sums.append(logged[step] * (step - previous))
                if weights == "interval":
                    exact = False
                    approximate.append(step)
        else:
            earlier = [s for s in logged if s <= step]
            nearest = max(earlier) if earlier else (min(logged) if logged else None)
            rate = logged[nearest] if nearest is not None else None
            rates.append(rate)
            sums.append(None if rate is None else rate * (step - previous))
            exact = False
            approximate.append(step)
        previous = step
    chosen = rates if weights == "lr" else sums
    if any(w is None for w in chosen):
        warnings.warn(
            f"no learning rates recorded for the checkpoints of {output_dir} (no "
            f"{CALLBACK_FILE} and no learning_rate in trainer_state.json): TracInCP will weight "
            "every checkpoint by 1. Train with hf_attrib.integrations.TracInCheckpointCallback "
            "(or logging_steps=1) to record them.", stacklevel=2)
        final = None
    else:
        final = [float(w) for w in chosen]  # type: ignore[arg-type]
        if approximate:
            warnings.warn(
                f"learning rates of checkpoints at steps {approximate} were not logged at those "
                "steps; using the nearest earlier logged rate. Train with "
                "TracInCheckpointCallback (or logging_steps=1) for exact TracInCP weights.",
                stacklevel=2)
    return TrainerCheckpoints(paths=[f for _, f in folders], steps=[s for s, _ in folders],
                              learning_rates=rates, interval_sums=sums,
                              exact=exact and final is not None, weights=final)


class TracInCheckpointCallback(TrainerCallback):
    """Record the learning rate the optimiser applied, and store it with every checkpoint.

    ``trainer = Trainer(..., callbacks=[TracInCheckpointCallback()])``. At each save, the
    callback writes ``checkpoint-<step>/hf_attrib_tracin.json`` with the rate applied at that
    step and the sum of the rates applied since the previous save; ``trainer_checkpoints`` (and
    ``task_from_pretrained(..., checkpoints=output_dir)``) read them back as exact TracInCP
    step sizes. ``records`` keeps the same dictionaries in memory.
    """

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.step_rates: dict[int, float] = {}
        self._pending: float | None = None
        self._sum = 0.0
        self._previous = 0

    def on_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None,
                          **kwargs: Any) -> None:
        # Called right after optimizer.step() and before the scheduler moves on: the rate in
        # the parameter groups is the one just applied.
        if optimizer is not None:
            self._pending = float(optimizer.param_groups[0]["lr"])

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._pending is not None:
            self.step_rates[int(state.global_step)] = self._pending
            self._sum += self._pending
            self._pending = None

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = int(state.global_step)
        if step not in self.step_rates:
            return
        record = {"step": step, "learning_rate": self.step_rates[step],
                  "learning_rate_sum": self._sum, "previous_step": self._previous}
        self.records.append(record)
        self._sum = 0.0
        self._previous = step
        folder = Path(args.output_dir) / f"checkpoint-{step}"
        if folder.is_dir() and getattr(state, "is_world_process_zero", True):
            tmp = folder / (CALLBACK_FILE + ".tmp")
            tmp.write_text(json.dumps(record, indent=2))
            os.replace(tmp, folder / CALLBACK_FILE)
