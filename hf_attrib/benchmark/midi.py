"""MIDI performance events: the 388-event encoding of the ``maestro_musictransformer`` setting.

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

Notes are read from MIDI files (:func:`notes_from_midi`, with ``pretty_midi``) or ``music21``
scores (:func:`notes_from_music21`, the offline stand-in); the MAESTRO windows built from the
events live in :mod:`hf_attrib.benchmark.music`.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from hf_attrib.benchmark.models.music_transformer import NUM_MIDI_EVENTS, TOKEN_END, TOKEN_PAD

__all__ = [
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
    "Note",
    "decode_events",
    "encode_notes",
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

assert NUM_EVENTS == NUM_MIDI_EVENTS

_VELOCITY_STEP = 128 // NUM_VELOCITY_BINS  # 4
_DEFAULT_VELOCITY = 64  # velocity of note-ons decoded before any VELOCITY event


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
