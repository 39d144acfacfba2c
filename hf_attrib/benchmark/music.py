"""MAESTRO-style performance events for the ``maestro_musictransformer`` setting.

Event vocabulary (Oore et al., 2018; Music Transformer; the dattri paper's Appendix C, 388
events), as in the ``midi_processor`` used by dattri's Music Transformer:

* ``0..127``: NOTE_ON of pitch ``p`` (token ``p``);
* ``128..255``: NOTE_OFF of pitch ``p`` (token ``128 + p``);
* ``256..355``: TIME_SHIFT of ``k`` steps of 10 ms, ``k = 1..100`` (token ``255 + k``); a gap
  longer than one second is several shifts (``100`` steps each, then the remainder);
* ``356..387``: VELOCITY bin ``b = velocity // 4`` (token ``356 + b``), which sets the velocity
  of the following note-ons; decoded back as ``4 * b``.

The Music Transformer adds ``TOKEN_END = 388`` and ``TOKEN_PAD = 389``.

Encoding (:func:`encode_notes`): note times are quantised to the 10 ms grid on the *absolute*
time line (so rounding errors never accumulate), notes shorter than one step after quantisation
are dropped, and overlapping notes of one pitch are made monophonic (a note is cut at the next
onset of its pitch; two onsets of one pitch at the same step keep the longer note). Events at
the same step are ordered note-offs first, then note-ons, each by pitch; a velocity event is
written only when the bin changes. :func:`decode_events` inverts this exactly:
``decode_events(encode_notes(notes)) == quantize_notes(notes)``.

Differences to the reference ``midi_processor`` (jason9693's, vendored in dattri): it
quantises the gaps between consecutive events (errors accumulate), compares the binned velocity
with the previous *raw* velocity (so it repeats velocity events), and its sustain-pedal handling
drops the notes that follow the last pedal release (and every note of a file without pedal
events). Here :func:`notes_from_midi` applies the pedal as Magenta's
``apply_sustain_control_changes`` does: a note released while the pedal (CC 64 >= 64) is down
lasts until the pedal is released, and a re-struck pitch ends the previous note.

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
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import numpy as np
import torch
from torch import nn

from hf_attrib.benchmark.models.music_transformer import NUM_MIDI_EVENTS, TOKEN_END, TOKEN_PAD

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

NUM_PITCHES = 128
NUM_TIME_SHIFTS = 100
NUM_VELOCITY_BINS = 32
NOTE_ON_OFFSET = 0
NOTE_OFF_OFFSET = NOTE_ON_OFFSET + NUM_PITCHES
TIME_SHIFT_OFFSET = NOTE_OFF_OFFSET + NUM_PITCHES
VELOCITY_OFFSET = TIME_SHIFT_OFFSET + NUM_TIME_SHIFTS
#: Size of the event vocabulary (388), the Music Transformer's ``NUM_MIDI_EVENTS``.
NUM_EVENTS = VELOCITY_OFFSET + NUM_VELOCITY_BINS
#: Time steps per second (one TIME_SHIFT step is 10 ms).
STEPS_PER_SECOND = 100
#: Prompt length of the paper's MAESTRO test set (the training window's 256 inputs).
MAESTRO_PROMPT_LEN = 256
#: Events generated per MAESTRO test sample ("music with a single event").
MAESTRO_NEW_TOKENS = 1

assert NUM_EVENTS == NUM_MIDI_EVENTS

_VELOCITY_STEP = 128 // NUM_VELOCITY_BINS  # 4
_DEFAULT_VELOCITY = 64  # velocity of note-ons decoded before any VELOCITY event
_MAESTRO_CSV = "maestro-v2.0.0.csv"
_SPLITS = ("train", "validation", "test")
_STANDIN_SUFFIXES = (".mxl", ".xml", ".musicxml", ".krn", ".mid", ".midi")
_CACHE_VERSION = 1


class Note(NamedTuple):
    """A performed note.

    Attributes:
        start: onset in seconds.
        end: release in seconds.
        pitch: MIDI pitch ``0..127``.
        velocity: MIDI velocity ``0..127``.
    """

    start: float
    end: float
    pitch: int
    velocity: int


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------
def velocity_bin(velocity: int) -> int:
    """The VELOCITY bin of a MIDI velocity (``velocity // 4``, clamped to ``0..127`` first)."""
    return min(max(int(velocity), 0), 127) // _VELOCITY_STEP


def _quantized_steps(notes: Iterable[Sequence[Any]]) -> list[tuple[int, int, int, int]]:
    """``(on_step, off_step, pitch, velocity_bin)`` after quantisation and monophony per pitch,
    sorted by ``(on_step, pitch)``."""
    by_pitch: dict[int, list[tuple[int, int, int]]] = {}
    for note in notes:
        start, end, pitch, velocity = note[:4]
        pitch = int(pitch)
        if not 0 <= pitch < NUM_PITCHES:
            raise ValueError(f"pitch {pitch} is outside 0..127.")
        if start < 0:
            raise ValueError(f"note onset {start} is negative.")
        on, off = round(start * STEPS_PER_SECOND), round(end * STEPS_PER_SECOND)
        if off > on:
            by_pitch.setdefault(pitch, []).append((on, off, velocity_bin(velocity)))
    result: list[tuple[int, int, int, int]] = []
    for pitch, group in by_pitch.items():
        group.sort(key=lambda n: (n[0], -n[1]))
        kept: list[list[int]] = []
        for on, off, vbin in group:
            if kept and on == kept[-1][0]:
                continue  # a second onset at the same step: keep the longer note
            if kept and on < kept[-1][1]:
                kept[-1][1] = on  # re-struck before release: end the sounding note
            kept.append([on, off, vbin])
        result.extend((on, off, pitch, vbin) for on, off, vbin in kept)
    result.sort(key=lambda n: (n[0], n[2]))
    return result


def quantize_notes(notes: Iterable[Sequence[Any]]) -> list[Note]:
    """The notes as :func:`encode_notes` represents them.

    Times are rounded to the 10 ms grid, velocities to ``4 * (velocity // 4)``, notes shorter
    than one step are dropped and overlapping notes of one pitch are cut at the next onset.

    Args:
        notes: ``(start_s, end_s, pitch, velocity)`` tuples (or :class:`Note`).

    Returns:
        :class:`Note` list sorted by ``(start, pitch)``.
    """
    return [Note(on / STEPS_PER_SECOND, off / STEPS_PER_SECOND, pitch, vbin * _VELOCITY_STEP)
            for on, off, pitch, vbin in _quantized_steps(notes)]


def encode_notes(notes: Iterable[Sequence[Any]]) -> list[int]:
    """Performance events (token ids ``0..387``) of a list of notes.

    Args:
        notes: ``(start_s, end_s, pitch, velocity)`` tuples (or :class:`Note`), in any order.

    Returns:
        The event sequence, starting at time 0 (leading silence is written as time shifts).

    Raises:
        ValueError: on a pitch outside ``0..127`` or a negative onset.
    """
    timeline: list[tuple[int, int, int, int]] = []
    for on, off, pitch, vbin in _quantized_steps(notes):
        timeline.append((on, 1, pitch, vbin))
        timeline.append((off, 0, pitch, -1))
    timeline.sort(key=lambda e: (e[0], e[1], e[2]))
    events: list[int] = []
    now = 0
    current_bin = -1
    for step, is_on, pitch, vbin in timeline:
        gap = step - now
        while gap > NUM_TIME_SHIFTS:
            events.append(TIME_SHIFT_OFFSET + NUM_TIME_SHIFTS - 1)
            gap -= NUM_TIME_SHIFTS
        if gap > 0:
            events.append(TIME_SHIFT_OFFSET + gap - 1)
        now = step
        if is_on:
            if vbin != current_bin:
                events.append(VELOCITY_OFFSET + vbin)
                current_bin = vbin
            events.append(NOTE_ON_OFFSET + pitch)
        else:
            events.append(NOTE_OFF_OFFSET + pitch)
    return events


def decode_events(events: Iterable[int]) -> list[Note]:
    """Notes of an event sequence (the inverse of :func:`encode_notes`).

    ``TOKEN_PAD`` is skipped and ``TOKEN_END`` ends the sequence. A NOTE_ON of a pitch that is
    already sounding ends the sounding note; a NOTE_OFF without a sounding note is ignored;
    notes still sounding at the end are released there; zero-length notes are dropped.
    Note-ons before any VELOCITY event get velocity 64.

    Args:
        events: token ids (a list, tensor or array).

    Returns:
        :class:`Note` list sorted by ``(start, pitch)``.

    Raises:
        ValueError: on a token id outside ``0..389``.
    """
    now = 0
    velocity = _DEFAULT_VELOCITY
    sounding: dict[int, tuple[int, int]] = {}
    steps: list[tuple[int, int, int, int]] = []

    def release(pitch: int) -> None:
        on, vel = sounding.pop(pitch)
        if now > on:
            steps.append((on, now, pitch, vel))

    values = events.tolist() if hasattr(events, "tolist") else events
    for token in values:
        token = int(token)
        if token == TOKEN_END:
            break
        if token == TOKEN_PAD:
            continue
        if not 0 <= token < NUM_EVENTS:
            raise ValueError(f"event {token} is outside the vocabulary (0..{TOKEN_PAD}).")
        if token < NOTE_OFF_OFFSET:
            pitch = token - NOTE_ON_OFFSET
            if pitch in sounding:
                release(pitch)
            sounding[pitch] = (now, velocity)
        elif token < TIME_SHIFT_OFFSET:
            pitch = token - NOTE_OFF_OFFSET
            if pitch in sounding:
                release(pitch)
        elif token < VELOCITY_OFFSET:
            now += token - TIME_SHIFT_OFFSET + 1
        else:
            velocity = (token - VELOCITY_OFFSET) * _VELOCITY_STEP
    for pitch in sorted(sounding):
        release(pitch)
    steps.sort(key=lambda n: (n[0], n[2]))
    return [Note(on / STEPS_PER_SECOND, off / STEPS_PER_SECOND, pitch, vel)
            for on, off, pitch, vel in steps]


# --------------------------------------------------------------------------------------------
# Note sources
# --------------------------------------------------------------------------------------------
def _pedal_intervals(control_changes: Iterable[Any], end_time: float) -> list[tuple[float, float]]:
    """``(down, up)`` intervals of the sustain pedal (CC 64 >= 64 is down)."""
    intervals: list[tuple[float, float]] = []
    down: float | None = None
    for cc in sorted((c for c in control_changes if c.number == 64), key=lambda c: c.time):
        if cc.value >= 64 and down is None:
            down = float(cc.time)
        elif cc.value < 64 and down is not None:
            intervals.append((down, float(cc.time)))
            down = None
    if down is not None:
        intervals.append((down, max(end_time, down)))
    return intervals


def _apply_sustain(notes: list[Note], intervals: list[tuple[float, float]]) -> list[Note]:
    """Extend notes released while the pedal is down to the pedal release."""
    if not intervals:
        return notes
    downs = [a for a, _ in intervals]
    out = []
    for note in notes:
        i = bisect_right(downs, note.end) - 1
        if i >= 0 and intervals[i][0] <= note.end < intervals[i][1]:
            note = note._replace(end=intervals[i][1])
        out.append(note)
    return out  # overlaps of a re-struck pitch are cut by the encoder


def notes_from_midi(path: str | Path, sustain: bool = True) -> list[Note]:
    """Notes of a MIDI file (all non-drum instruments), read with ``pretty_midi``.

    Args:
        path: the ``.mid``/``.midi`` file.
        sustain: apply the sustain pedal (CC 64): a note released while the pedal is down
            lasts until the pedal is released (a re-struck pitch is cut by the encoder).

    Returns:
        :class:`Note` list sorted by ``(start, pitch)``.

    Raises:
        ModuleNotFoundError: if ``pretty_midi`` is not installed.
    """
    try:
        import pretty_midi
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError("reading MIDI files needs pretty_midi: "
                                  "`pip install pretty_midi`.") from err
    midi = pretty_midi.PrettyMIDI(str(path))
    end_time = float(midi.get_end_time())
    notes: list[Note] = []
    for instrument in midi.instruments:
        if instrument.is_drum:
            continue
        own = [Note(float(n.start), float(n.end), int(n.pitch), int(n.velocity))
               for n in instrument.notes]
        if sustain:
            own = _apply_sustain(own, _pedal_intervals(instrument.control_changes, end_time))
        notes.extend(own)
    notes.sort(key=lambda n: (n.start, n.pitch))
    return notes


def notes_from_music21(score: Any, bpm: float = 120.0, velocity: int = 80) -> list[Note]:
    """Notes of a ``music21`` score at a fixed tempo and velocity (the offline stand-in).

    Tied notes are merged (``stripTies``), every pitch of a chord is a note, grace notes
    (zero duration) are dropped; repeats are not expanded and tempo marks are ignored.

    Args:
        score: a ``music21`` stream (``Score``, ``Part``, ...).
        bpm: quarter notes per minute (offsets in quarter notes become ``offset * 60 / bpm``
            seconds).
        velocity: velocity of every note.

    Returns:
        :class:`Note` list sorted by ``(start, pitch)``.
    """
    seconds = 60.0 / bpm
    flat = score.stripTies(inPlace=False).flatten()
    notes: list[Note] = []
    for element in flat.notes:
        length = float(element.quarterLength)
        if length <= 0:
            continue
        start = float(flat.elementOffset(element)) * seconds
        end = start + length * seconds
        for pitch in getattr(element, "pitches", ()):
            if 0 <= pitch.midi < NUM_PITCHES:
                notes.append(Note(start, end, int(pitch.midi), int(velocity)))
    notes.sort(key=lambda n: (n.start, n.pitch))
    return notes


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

    A thin wrapper of :func:`hf_attrib.benchmark.text.build_generated_test_set` that samples
    only the 388 events (never ``TOKEN_END``/``TOKEN_PAD``).

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
    from hf_attrib.benchmark.text import build_generated_test_set

    pool = data.test if isinstance(data, MusicData) else data
    return build_generated_test_set(model, pool, n_test, prompt_len, new_tokens, seed,
                                    temperature=temperature, vocab=NUM_EVENTS)
