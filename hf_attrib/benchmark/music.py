"""MAESTRO windows and test set for the ``maestro_musictransformer`` setting.

The pieces are encoded as MIDI performance events (388 events; the encoding is
:mod:`hf_attrib.benchmark.midi`, whose names this module re-exports) and cut into training
windows.

Samples (:func:`build_maestro`), following dattri's MAESTRO data (``MAX_SEQUENCE = 256``,
``EPianoDataset(full_version=True)``): every piece is cut into non-overlapping windows of
``seq_len + 1 = 257`` events at offsets ``0, 256, 512, ...`` (``(L - 1) // 256`` windows for a
piece of ``L`` events; the tail is dropped). ``input_ids`` is the window and ``labels`` equals
it: with the model's internal shift this is exactly dattri's ``(x, tgt)`` pair, 256 inputs
and 256 next-event targets. A piece too short for one window (more common in the offline
stand-in) becomes one window padded with ``TOKEN_PAD`` whose last event is followed by
``TOKEN_END``, as in the reference ``process_midi``; padded positions have label ``-100``.
``n_train`` windows of the train split are sampled with the seed (dattri's released benchmark
takes the first 5000 windows in sorted file order: ``sampling="first"``).

Test set: the paper's 178 prompts come from the official test split, each continued by one
generated event: :func:`build_maestro_test_set` (``prompt_len = 256``, one new event; the test
samples are 257 events long like the training windows, only the generated event is scored).

Sources: a local MAESTRO v2.0.0 folder (``maestro-v2.0.0.csv`` with its ``split`` and
``midi_filename`` columns; needs ``pretty_midi``), or, offline, the Bach works of music21's
corpus (``pip install music21``): each score's notes (ties merged, grace notes dropped) are
placed at a fixed 120 bpm with velocity 80, and pieces are split 8:1:1 by their index in
sorted path order (index ``% 10 == 8``: validation, ``== 9``: test). The stand-in is far
smaller than MAESTRO: its 413 Bach scores (331 train, 41 validation, 41 test; a median of 510
events) give 587 training windows, not 5000, which :func:`build_maestro` says in a warning and
in ``info``, and 95 test windows, fewer than the 178 prompts: pass ``eval_stride=64`` (319 test
windows) or more composers. Reading all 413 scores takes about 3 minutes; ``cache_dir`` keeps
the encoded events.
"""

from __future__ import annotations

import csv
import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch import nn

from hf_attrib.benchmark.midi import (
    NOTE_OFF_OFFSET,
    NOTE_ON_OFFSET,
    NUM_EVENTS,
    NUM_PITCHES,
    NUM_TIME_SHIFTS,
    NUM_VELOCITY_BINS,
    STEPS_PER_SECOND,
    TIME_SHIFT_OFFSET,
    TOKEN_END,
    TOKEN_PAD,
    VELOCITY_OFFSET,
    Note,
    decode_events,
    encode_notes,
    notes_from_midi,
    notes_from_music21,
    quantize_notes,
    velocity_bin,
)
from hf_attrib.benchmark.sampling import build_generated_test_set

# The event encoding's names (hf_attrib.benchmark.midi) are re-exported here, their old home.
__all__ = [
    "MAESTRO_NEW_TOKENS",
    "MAESTRO_PROMPT_LEN",
    "NOTE_OFF_OFFSET",
    "NOTE_ON_OFFSET",
    "NUM_EVENTS",
    "NUM_PITCHES",
    "NUM_TIME_SHIFTS",
    "NUM_VELOCITY_BINS",
    "STEPS_PER_SECOND",
    "TIME_SHIFT_OFFSET",
    "TOKEN_END",
    "TOKEN_PAD",
    "VELOCITY_OFFSET",
    "MusicData",
    "Note",
    "build_maestro",
    "build_maestro_test_set",
    "decode_events",
    "encode_notes",
    "event_windows",
    "notes_from_midi",
    "notes_from_music21",
    "quantize_notes",
    "velocity_bin",
]

#: Prompt length of the paper's MAESTRO test set (the training window's 256 inputs).
MAESTRO_PROMPT_LEN = 256
#: Events generated per MAESTRO test sample ("music with a single event").
MAESTRO_NEW_TOKENS = 1

_MAESTRO_CSV = "maestro-v2.0.0.csv"
_SPLITS = ("train", "validation", "test")
_STANDIN_SUFFIXES = (".mxl", ".xml", ".musicxml", ".krn", ".mid", ".midi")
_CACHE_VERSION = 1


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------
@dataclass
class _Piece:
    name: str
    split: str
    path: Path


def _maestro_pieces(folder: Path) -> list[_Piece]:
    csv_path = folder / _MAESTRO_CSV
    if not csv_path.is_file():
        found = sorted(folder.glob("maestro-v*.csv"))
        if len(found) != 1:
            raise FileNotFoundError(f"{folder} has no {_MAESTRO_CSV}; pass the folder of the "
                                    "extracted MAESTRO v2.0.0 MIDI archive, or source=None for "
                                    "the offline music21 stand-in.")
        csv_path = found[0]
        warnings.warn(f"using {csv_path.name} instead of {_MAESTRO_CSV}", stacklevel=3)
    with csv_path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    pieces = []
    for row in rows:
        split = row["split"].strip()
        if split not in _SPLITS:
            raise ValueError(f"{csv_path.name}: unknown split {split!r}.")
        name = row["midi_filename"].strip()
        pieces.append(_Piece(name=name, split=split, path=folder / name))
    # dattri reads each split's pickled pieces in sorted file-name order
    pieces.sort(key=lambda p: (Path(p.name).name, p.name))
    return pieces


def _standin_pieces(composers: Sequence[str]) -> list[_Piece]:
    try:
        from music21 import corpus
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError("the offline MAESTRO stand-in needs music21 "
                                  "(`pip install music21`); or pass source= a MAESTRO v2.0.0 "
                                  "folder.") from err
    found: list[tuple[str, Path]] = []
    for composer in composers:
        paths = sorted((Path(p) for p in corpus.getComposer(composer)
                        if Path(p).suffix.lower() in _STANDIN_SUFFIXES), key=lambda p: p.name)
        if not paths:
            raise FileNotFoundError(f"music21's corpus has no scores by {composer!r}.")
        found.extend((composer, path) for path in paths)
    pieces = []
    for i, (composer, path) in enumerate(found):
        split = "validation" if i % 10 == 8 else "test" if i % 10 == 9 else "train"
        pieces.append(_Piece(name=f"{composer}/{path.name}", split=split, path=path))
    return pieces


def _cache_file(cache_dir: Path, piece: _Piece, options: dict[str, Any]) -> Path:
    key = json.dumps({"path": str(piece.path.resolve()), "v": _CACHE_VERSION, **options},
                     sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return cache_dir / f"{Path(piece.name).stem}-{digest}.json"


def _encode_piece(piece: _Piece, standin: bool, options: dict[str, Any],
                  cache_dir: Path | None) -> np.ndarray:
    cached = _cache_file(cache_dir, piece, options) if cache_dir is not None else None
    if cached is not None and cached.is_file():
        return np.asarray(json.loads(cached.read_text()), dtype=np.int16)
    if standin:
        from music21 import corpus

        notes = notes_from_music21(corpus.parse(piece.path), bpm=options["bpm"],
                                   velocity=options["velocity"])
    else:
        notes = notes_from_midi(piece.path, sustain=options["sustain"])
    events = encode_notes(notes)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(events))
    return np.asarray(events, dtype=np.int16)


# --------------------------------------------------------------------------------------------
# Windows and splits
# --------------------------------------------------------------------------------------------
def _window_offsets(length: int, seq_len: int, stride: int, pad_short: bool) -> list[int]:
    if length >= seq_len + 1:
        return list(range(0, length - seq_len, stride))
    return [0] if pad_short and length >= 1 else []


def _window(events: np.ndarray, offset: int, seq_len: int) -> list[int]:
    chunk = events[offset:offset + seq_len + 1].astype(np.int64).tolist()
    if len(chunk) < seq_len + 1:
        chunk = [*chunk, TOKEN_END] + [TOKEN_PAD] * (seq_len - len(chunk))
    return chunk


def event_windows(events: Sequence[int] | np.ndarray, seq_len: int = 256,
                  stride: int | None = None, pad_short: bool = True) -> list[list[int]]:
    """Cut one piece's events into training windows of ``seq_len + 1`` events.

    Windows start at ``0, stride, 2 * stride, ...`` and are kept while complete (dattri's
    ``EPianoDataset(full_version=True)`` slicing: ``(L - 1) // seq_len`` windows with the
    default stride). A piece shorter than ``seq_len + 1`` events gives one window: its events,
    ``TOKEN_END``, then ``TOKEN_PAD`` (or none with ``pad_short=False``).

    Args:
        events: the piece's event ids.
        seq_len: model inputs per window (each window holds ``seq_len + 1`` events, so the
            shifted loss has ``seq_len`` targets).
        stride: distance between window starts (``None``: ``seq_len``, non-overlapping).
        pad_short: keep a padded window for a piece shorter than one window.

    Returns:
        The windows (lists of ``seq_len + 1`` ids).
    """
    array = np.asarray(events, dtype=np.int64)
    stride = seq_len if stride is None else stride
    if seq_len < 1 or stride < 1:
        raise ValueError("seq_len and stride must be positive.")
    return [_window(array, o, seq_len)
            for o in _window_offsets(array.shape[0], seq_len, stride, pad_short)]


def _windows_dataset(rows: list[list[int]]) -> datasets.Dataset:
    labels = [[-100 if t == TOKEN_PAD else t for t in row] for row in rows]
    features = datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int64")),
        "labels": datasets.Sequence(datasets.Value("int64")),
    })
    return datasets.Dataset.from_dict({"input_ids": rows, "labels": labels}, features=features)


@dataclass
class MusicData:
    """The windows of the MAESTRO setting.

    Attributes:
        train: the ``n_train`` sampled training windows (``input_ids``, ``labels``).
        validation: every window of the validation split (in piece order).
        test: every window of the test split: the prompt pool of the generated test set.
        info: provenance: ``source``, ``seq_len``, ``pieces`` (names per split), ``windows``
            (windows per split before sampling), ``n_train``/``n_train_requested``,
            ``train_windows`` (``[piece index in pieces["train"], offset]`` of each training
            row) and ``sampling``.
    """

    train: datasets.Dataset
    validation: datasets.Dataset
    test: datasets.Dataset
    info: dict[str, Any] = field(default_factory=dict)


def build_maestro(
    source: str | Path | None = None,
    n_train: int = 5000,
    seq_len: int = 256,
    seed: int = 0,
    max_pieces: int | None = None,
    *,
    sampling: str = "random",
    eval_stride: int | None = None,
    pad_short: bool = True,
    sustain: bool = True,
    bpm: float = 120.0,
    velocity: int = 80,
    composer: str | Sequence[str] = "bach",
    cache_dir: str | Path | None = None,
) -> MusicData:
    """Training, validation and test windows of MAESTRO (or of the offline stand-in).

    Args:
        source: a local MAESTRO v2.0.0 folder (``maestro-v2.0.0.csv`` next to the MIDI year
            folders; the csv's ``split`` column gives the official split), or ``None`` for the
            offline stand-in: music21's corpus works by ``composer`` (Bach chorales), split
            8:1:1 by index.
        n_train: training windows to sample (all of them, with a warning, if there are fewer).
        seq_len: model inputs per window (dattri's ``MAX_SEQUENCE = 256``); windows hold
            ``seq_len + 1`` events.
        seed: seed of the training sample.
        max_pieces: read at most this many pieces of each split (the first in sorted order);
            ``None`` reads all.
        sampling: ``"random"`` (a seeded random sample, in sampled order) or ``"first"`` (the
            first ``n_train`` windows in piece order, as dattri's released benchmark).
        eval_stride: window stride of the validation and test splits (``None``: ``seq_len``,
            non-overlapping; a smaller stride gives more prompts from a small source).
        pad_short: keep one padded window for pieces shorter than a window.
        sustain: apply the sustain pedal when reading MIDI (MAESTRO only).
        bpm: tempo of the stand-in scores.
        velocity: velocity of the stand-in notes.
        composer: music21 corpus composer(s) of the stand-in (``"bach"``: the chorales;
            e.g. ``("bach", "palestrina")`` for a larger stand-in; pieces are listed by
            composer, then file name, before the 8:1:1 split).
        cache_dir: cache each piece's events here as JSON (keyed by path and options).

    Returns:
        :class:`MusicData` with ``train``, ``validation``, ``test`` and ``info``.

    Raises:
        ValueError: on an unknown ``sampling`` or a source without training windows.
        FileNotFoundError: if ``source`` is not a MAESTRO folder.
        ModuleNotFoundError: if ``pretty_midi`` (MAESTRO) or ``music21`` (stand-in) is
            missing.
    """
    if sampling not in ("random", "first"):
        raise ValueError(f"sampling must be 'random' or 'first', got {sampling!r}.")
    standin = source is None
    if standin:
        composers = [composer] if isinstance(composer, str) else list(composer)
        pieces = _standin_pieces(composers)
        options: dict[str, Any] = {"bpm": float(bpm), "velocity": int(velocity)}
        source_name = f"music21 corpus ({', '.join(composers)}), offline stand-in"
    else:
        folder = Path(source)
        if not folder.is_dir():
            raise FileNotFoundError(f"{source} is not a folder; pass the extracted MAESTRO "
                                    "v2.0.0 folder, or None for the offline stand-in.")
        pieces = _maestro_pieces(folder)
        options = {"sustain": bool(sustain)}
        source_name = str(folder)
    cache = Path(cache_dir) if cache_dir is not None else None
    by_split: dict[str, list[_Piece]] = {s: [p for p in pieces if p.split == s] for s in _SPLITS}
    if max_pieces is not None:
        by_split = {s: ps[:max_pieces] for s, ps in by_split.items()}
    events = {s: [_encode_piece(p, standin, options, cache) for p in ps]
              for s, ps in by_split.items()}

    strides = {"train": seq_len, "validation": eval_stride or seq_len,
               "test": eval_stride or seq_len}
    index = {s: [(i, o) for i, ev in enumerate(events[s])
                 for o in _window_offsets(ev.shape[0], seq_len, strides[s], pad_short)]
             for s in _SPLITS}
    available = len(index["train"])
    if available == 0:
        raise ValueError("the source has no training windows.")
    if sampling == "first":
        chosen = list(range(min(n_train, available)))
    else:
        order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))
        chosen = order[:n_train].tolist()
    if available < n_train:
        warnings.warn(f"{source_name} has {available} training windows of {seq_len + 1} "
                      f"events, fewer than n_train={n_train}; using all of them.", stacklevel=2)
    train_windows = [index["train"][j] for j in chosen]

    def rows(split: str, entries: list[tuple[int, int]]) -> list[list[int]]:
        return [_window(events[split][i], o, seq_len) for i, o in entries]

    info = {
        "source": source_name,
        "seq_len": seq_len,
        "sampling": sampling,
        "seed": seed,
        "pieces": {s: [p.name for p in ps] for s, ps in by_split.items()},
        "windows": {s: len(index[s]) for s in _SPLITS},
        "n_train_requested": n_train,
        "n_train": len(train_windows),
        "train_windows": [[i, o] for i, o in train_windows],
    }
    return MusicData(
        train=_windows_dataset(rows("train", train_windows)),
        validation=_windows_dataset(rows("validation", index["validation"])),
        test=_windows_dataset(rows("test", index["test"])),
        info=info,
    )


def build_maestro_test_set(model: nn.Module, data: MusicData | datasets.Dataset,
                           n_test: int = 178, seed: int = 0,
                           prompt_len: int = MAESTRO_PROMPT_LEN,
                           new_tokens: int = MAESTRO_NEW_TOKENS,
                           temperature: float = 1.0) -> datasets.Dataset:
    """The paper's MAESTRO test set: test-split prompts, each continued by one sampled event.

    A thin wrapper of :func:`hf_attrib.benchmark.sampling.build_generated_test_set` that
    samples only the 388 events (never ``TOKEN_END``/``TOKEN_PAD``).

    Args:
        model: the trained Music Transformer.
        data: the :class:`MusicData` (its ``test`` split is used) or a prompt split.
        n_test: number of test samples (178 in the paper).
        seed: seed of the prompt choice and of the sampling.
        prompt_len: prompt events (256: a training window's inputs).
        new_tokens: generated events (1 in the paper).
        temperature: softmax temperature of the sampling.

    Returns:
        ``input_ids`` (``prompt_len + new_tokens`` events), ``labels`` (``-100`` on the prompt)
        and ``prompt_index``.
    """
    pool = data.test if isinstance(data, MusicData) else data
    return build_generated_test_set(model, pool, n_test, prompt_len, new_tokens, seed,
                                    temperature=temperature, vocab=NUM_EVENTS)
