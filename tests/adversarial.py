"""Hostile MIDI files for the ingestion tests, built byte by byte.

Each builder reproduces one failure mode of LIBRARY_NOTES §6 (or a file-system oddity a real
download folder contains). ``write_adversarial_files`` writes them all and returns the stage
polyphony.data.prepare must report for each path.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
from symusic import Note, Score, Tempo, TimeSignature, Track

# Worker misbehaviour through prepare's test hook (POLYPHONY_PREPARE_TEST_HOOK).
TEST_HOOK = "hang:stalls_parser.mid,oom:explodes_memory.mid,segfault:crashes_parser.mid"
MAX_NOTES = 5_000  # the tests' data.max_notes, so "too many notes" stays a small file


def vlq(value: int) -> bytes:
    """MIDI variable-length quantity (delta times)."""
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


def track_chunk(events: list[tuple[int, bytes]]) -> bytes:
    body = b"".join(vlq(delta) + event for delta, event in events) + b"\x00\xff\x2f\x00"
    return b"MTrk" + struct.pack(">I", len(body)) + body


def midi_bytes(events: list[tuple[int, bytes]], tpq: int = 480) -> bytes:
    header = b"MThd" + struct.pack(">IHHH", 6, 0, 1, tpq)
    return header + track_chunk(events)


def note_on(pitch: int, velocity: int = 100) -> bytes:
    return bytes([0x90, pitch, velocity])


def note_off(pitch: int) -> bytes:
    return bytes([0x80, pitch, 0])


def one_note(pitch: int = 60, delta: int = 0) -> list[tuple[int, bytes]]:
    return [(delta, note_on(pitch)), (480, note_off(pitch))]


def meter(numerator: int, denominator_power: int) -> bytes:
    return bytes([0xFF, 0x58, 0x04, numerator, denominator_power, 0x18, 0x08])


def small_score(seed: int, n_notes: int = 16, program: int = 0) -> Score:
    """A valid, distinct one-track piece (the hooked files must not be duplicates)."""
    rng = np.random.default_rng(seed)
    score = Score(480)
    score.tempos.append(Tempo(0, 120.0))
    score.time_signatures.append(TimeSignature(0, 4, 4))
    track = Track(program=program)
    track.notes = Note.from_numpy(
        np.arange(n_notes, dtype=np.int32) * 240,
        np.full(n_notes, 240, dtype=np.int32),
        rng.integers(48, 84, n_notes).astype(np.int8),
        rng.integers(40, 120, n_notes).astype(np.int8),
    )
    score.tracks.append(track)
    return score


def write_extra_good_files(directory: Path) -> list[str]:
    """Valid files under the other accepted extensions, in any case (.KAR, .midi)."""
    directory.mkdir(parents=True, exist_ok=True)
    names = ["karaoke.KAR", "tune.midi"]
    for seed, name in enumerate(names):
        small_score(10 + seed, n_notes=32, program=24 + seed).dump_midi(directory / name)
    return names


def write_adversarial_files(directory: Path, good_file: Path) -> dict[str, str]:
    """Write the hostile files into ``directory``; return {relative path: expected stage}."""
    directory.mkdir(parents=True, exist_ok=True)
    good = good_file.read_bytes()
    skip_overflow = [(0x0FFFFFFF, b"\xff\x01\x00")] * 9  # 9 maximal deltas: > 2^31 ticks
    files: dict[str, tuple[bytes, str]] = {
        "truncated.mid": (good[: len(good) // 2], "read"),
        "random_bytes.mid": (np.random.default_rng(0).bytes(4096), "read"),
        "too_short.mid": (b"MThd\x00\x00\x00", "read"),  # < 14 bytes
        "text_renamed.mid": (b"These are not the notes you are looking for.\n" * 20, "read"),
        "pitch_200.mid": (midi_bytes([(0, bytes([0x90, 200, 100])), (480, note_off(60))]), "read"),
        "smpte_division.mid": (
            b"MThd" + struct.pack(">IHHH", 6, 0, 1, 0xE728) + track_chunk(one_note()),
            "read",
        ),
        "ZERO_LENGTH.MIDI": (b"", "read"),  # upper-case extension, zero bytes
        "header_only.mid": (b"MThd" + struct.pack(">IHHH", 6, 1, 0, 480), "validate"),
        "tpq_zero.mid": (midi_bytes(one_note(), tpq=0), "validate"),
        "tick_overflow.mid": (midi_bytes(one_note() + skip_overflow + one_note(62)), "validate"),
        "giant_gap.mid": (midi_bytes(one_note() + one_note(62, delta=50_000_000)), "validate"),
        "never_released.mid": (midi_bytes([(10, note_on(40 + i)) for i in range(40)]), "validate"),
        "meter_11_16.mid": (midi_bytes([(0, meter(11, 4))] + one_note()), "validate"),
        "meter_4_over_0.mid": (midi_bytes([(0, meter(4, 0xFF))] + one_note()), "validate"),
        "tempo_zero.mid": (midi_bytes([(0, b"\xff\x51\x03\x00\x00\x00")] + one_note()), "validate"),
        # One note, then another 1,500 bars later: within max_bars, but hundreds of tokens per note.
        "mostly_silence.mid": (
            midi_bytes(one_note() + one_note(64, delta=1500 * 1920)),
            "validate",
        ),
        "stalls_parser.mid": (small_score(1).dumps_midi(), "timeout"),
        "explodes_memory.mid": (small_score(2).dumps_midi(), "memory"),
        "crashes_parser.mid": (small_score(3).dumps_midi(), "crash"),
        "zz_copy_of_a_good_file.mid": (good, "duplicate"),
    }
    many = small_score(4, n_notes=MAX_NOTES + 1)
    files["too_many_notes.mid"] = (many.dumps_midi(), "validate")
    expected = {}
    for name, (data, stage) in files.items():
        (directory / name).write_bytes(data)
        expected[name] = stage
    # File-system oddities: a folder named like a MIDI file (walked into, not read), a link
    # loop (never followed), a link to itself, a dangling link, a named pipe.
    (directory / "folder.mid").mkdir()
    (directory / "folder.mid" / "notes.txt").write_text("not music")
    (directory / "loop").symlink_to(".")
    (directory / "self_link.mid").symlink_to("self_link.mid")
    (directory / "dangling.mid").symlink_to("does_not_exist.mid")
    os.mkfifo(directory / "named_pipe.mid")
    expected.update({"self_link.mid": "read", "dangling.mid": "read", "named_pipe.mid": "read"})
    return expected


def write_repairable_files(directory: Path) -> dict[str, int]:
    """Files a notation program writes: data bytes above 127 where players clamp them. Returns
    {name: the number of notes}; each note's pitch is intact."""
    directory.mkdir(parents=True, exist_ok=True)
    notes = [(0, bytes([0x90, 60 + i, 204 if i % 2 else 90])) for i in range(4)]
    offs = [(480 if i == 0 else 0, note_off(60 + i)) for i in range(4)]
    files = {
        "velocity_204.mid": midi_bytes(notes + offs),
        "controller_168.mid": midi_bytes([(0, bytes([0xB0, 7, 168]))] + one_note(64)),
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return {"velocity_204.mid": 4, "controller_168.mid": 1}


def tempo(mspq: int) -> bytes:
    return b"\xff\x51\x03" + mspq.to_bytes(3, "big")


def write_generation_hostile_files(directory: Path) -> list[str]:
    """Files that are valid enough to parse but make a naive reader do unbounded work: each
    must end in a score or one-line refusal within a request's time bound."""
    directory.mkdir(parents=True, exist_ok=True)
    chord = [(0, note_on(p % 88 + 21)) for p in range(100_000)]
    chord += [(480 if i == 0 else 0, note_off(p % 88 + 21)) for i, p in enumerate(range(100_000))]
    files = {
        "chord_100k_notes_one_tick.mid": midi_bytes(chord),
        "tempo_100k_changes.mid": midi_bytes(
            [(1, tempo(400_000 + i % 200_000)) for i in range(100_000)] + one_note()
        ),
        "meter_20k_changes.mid": midi_bytes(
            [(1, meter(3 + i % 2, 2)) for i in range(20_000)] + one_note()
        ),
        "note_997_huge_gap.mid": midi_bytes(
            [
                e
                for i in range(997)
                for e in ((0 if i else 0, note_on(40 + i % 40)), (120, note_off(40 + i % 40)))
            ]
            + one_note(60, delta=1_800 * 1920)
        ),
        "note_ending_far_beyond.mid": midi_bytes([(0, note_on(60)), (2**27, note_off(60))]),
        "max_vlq_delta.mid": midi_bytes(
            one_note() + [(0x0FFFFFFF, note_on(62)), (480, note_off(62))]
        ),
        "overlapping_same_pitch.mid": midi_bytes(
            [(0, note_on(60)) for _ in range(2_000)] + [(480, note_off(60))] * 2_000
        ),
        "one_note_long_silence.mid": midi_bytes(one_note() + [(1_900 * 1920, b"\xff\x01\x00")]),
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return sorted(files)
