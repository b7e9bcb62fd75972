"""polyphony.data.prepare: hostile folders, worker isolation, determinism, incremental runs, CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pytest
from adversarial import (
    MAX_NOTES,
    TEST_HOOK,
    midi_bytes,
    note_off,
    small_score,
    write_adversarial_files,
    write_extra_good_files,
    write_repairable_files,
)
from symusic import Score

from polyphony.config import DataConfig
from polyphony.data import isolation
from polyphony.data.isolation import TEST_HOOK_ENV
from polyphony.data.midi_input import process_file, read_score
from polyphony.data.prepare import (
    MANIFEST_FILE,
    REPORT_FILE,
    SPLITS,
    main,
    prepare_dataset,
)
from polyphony.data.shards import split_of
from polyphony.tokenizer import PolyTokenizer

SHARD_FILES = ("ids.npy", "track_ids.npy", "offsets.npy", "pieces.jsonl")
TIMEOUT_S = 3.0  # generous for the good files on a busy 2-core machine, short for the test


def config(**overrides) -> DataConfig:
    values = {
        "file_timeout_s": TIMEOUT_S,
        "max_memory_mb": 512,
        "max_notes": MAX_NOTES,
        "validation_fraction": 0.2,
        "test_fraction": 0.1,
    }
    return DataConfig(**{**values, **overrides})


def output_bytes(dataset_dir: Path) -> dict[str, bytes]:
    """Every output file except the cache, by relative path."""
    return {
        p.relative_to(dataset_dir).as_posix(): p.read_bytes()
        for p in sorted(dataset_dir.rglob("*"))
        if p.is_file() and p.relative_to(dataset_dir).parts[0] != "cache"
    }


def read_report(dataset_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (dataset_dir / REPORT_FILE).read_text().splitlines()]


def live_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if p.is_running()]


@pytest.fixture(scope="module")
def clean_dir(fixture_midi_dir, tmp_path_factory) -> Path:
    """The real fixtures plus valid .KAR / .midi files."""
    midi_dir = tmp_path_factory.mktemp("clean") / "midi"
    shutil.copytree(fixture_midi_dir, midi_dir)
    write_extra_good_files(midi_dir / "extra")
    return midi_dir


@pytest.fixture(scope="module")
def clean_run(clean_dir, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("clean_out")
    return out_dir, prepare_dataset(clean_dir, out_dir, config(), workers=1, progress=False)


@pytest.fixture(scope="module")
def hostile(clean_dir, tmp_path_factory):
    """The clean files plus every hostile file, prepared with 1 and with 2 workers."""
    midi_dir = tmp_path_factory.mktemp("hostile") / "midi"
    shutil.copytree(clean_dir, midi_dir)
    good_file = sorted(clean_dir.rglob("*.mid"))[0]
    expected = write_adversarial_files(midi_dir, good_file)
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(TEST_HOOK_ENV, TEST_HOOK)
        for workers in (1, 2):
            out_dir = tmp_path_factory.mktemp(f"hostile_out_{workers}")
            runs[workers] = (out_dir, prepare_dataset(midi_dir, out_dir, config(), workers, False))
    return expected, runs


def test_hostile_files_are_reported_not_fatal(hostile, clean_run):
    expected, runs = hostile
    out_dir, summary = runs[1]
    clean_out, clean_summary = clean_run
    report = read_report(out_dir)
    assert {entry["path"]: entry["stage"] for entry in report} == expected
    assert all(len(entry["reason"]) > 25 for entry in report)  # a sentence, not a code
    assert summary.skipped == dict(Counter(expected.values()))
    assert summary.ok == clean_summary.ok == clean_summary.files_found
    # The good files' shards are exactly what a run without the hostile files writes.
    for split in SPLITS:
        for name in SHARD_FILES:
            assert (out_dir / split / name).read_bytes() == (clean_out / split / name).read_bytes()
    assert not live_children()


def test_reasons_name_the_problem(hostile):
    _, runs = hostile
    reasons = {entry["path"]: entry["reason"] for entry in read_report(runs[1][0])}
    assert "0 ticks per quarter" in reasons["tpq_zero.mid"]
    assert "pitch 200 is outside" in reasons["pitch_200.mid"]
    assert "no MThd header" in reasons["text_renamed.mid"]
    assert "negative tick" in reasons["tick_overflow.mid"]
    assert "data.max_bars" in reasons["giant_gap.mid"]
    assert "11/16" in reasons["meter_11_16.mid"]
    assert "data.max_notes" in reasons["too_many_notes.mid"]
    assert "data.max_tokens_per_note" in reasons["mostly_silence.mid"]
    assert f"data.file_timeout_s={TIMEOUT_S:g}" in reasons["stalls_parser.mid"]
    assert "SIGSEGV" in reasons["crashes_parser.mid"]
    assert "data.max_memory_mb=512" in reasons["explodes_memory.mid"]
    duplicate_of = reasons["zz_copy_of_a_good_file.mid"].split("same content as ")[1]
    assert duplicate_of.split(";")[0].endswith(".mid")


def test_worker_count_does_not_change_output(hostile):
    _, runs = hostile
    one, two = output_bytes(runs[1][0]), output_bytes(runs[2][0])
    assert one.keys() == two.keys() and MANIFEST_FILE in one
    assert [name for name in one if one[name] != two[name]] == []


def test_a_hanging_file_is_killed_at_the_timeout(tmp_path, monkeypatch):
    midi_dir = tmp_path / "midi"
    midi_dir.mkdir()
    small_score(1).dump_midi(midi_dir / "stalls_parser.mid")
    small_score(2).dump_midi(midi_dir / "fine.mid")
    monkeypatch.setenv(TEST_HOOK_ENV, TEST_HOOK)
    started = time.monotonic()
    summary = prepare_dataset(midi_dir, tmp_path / "out", config(file_timeout_s=1.0), 1, False)
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 10.0  # the sleep is 10^6 s: only the kill ends it
    assert summary.skipped == {"timeout": 1} and summary.ok == 1
    assert not live_children()


def test_incremental_rerun_processes_only_new_files(clean_dir, tmp_path):
    midi_dir, out_dir = tmp_path / "midi", tmp_path / "out"
    shutil.copytree(clean_dir, midi_dir)
    first = prepare_dataset(midi_dir, out_dir, config(), workers=2, progress=False)
    assert first.processed == first.files_found and first.cached == 0

    (midi_dir / "new").mkdir()
    small_score(20, n_notes=40).dump_midi(midi_dir / "new" / "added.mid")
    (midi_dir / "new" / "broken.mid").write_bytes(b"MThd" + bytes(range(40)))
    second = prepare_dataset(midi_dir, out_dir, config(), workers=2, progress=False)
    assert (second.processed, second.cached) == (2, first.files_found)
    assert second.ok == first.ok + 1 and second.skipped == {"read": 1}

    third = prepare_dataset(midi_dir, out_dir, config(), workers=2, progress=False)
    assert third.processed == 0  # failures are cached too
    fresh_dir = tmp_path / "fresh"
    prepare_dataset(midi_dir, fresh_dir, config(), workers=2, progress=False)
    assert output_bytes(out_dir) == output_bytes(fresh_dir)

    # New limits apply to cached pieces without re-tokenizing them; cached failures are retried.
    pieces = [
        json.loads(line)
        for split in SPLITS
        for line in (out_dir / split / "pieces.jsonl").read_text().splitlines()
    ]
    limit = int(np.median([p["n_notes"] for p in pieces]))
    stricter = prepare_dataset(midi_dir, out_dir, config(max_notes=limit), 2, False)
    assert stricter.processed == 1  # broken.mid, whose cached failure was under other limits
    too_long = sum(p["n_notes"] > limit for p in pieces)
    assert stricter.skipped == {"read": 1, "validate": too_long} and too_long > 0


def test_a_cache_cut_short_is_redone_not_trusted(tmp_path):
    midi_dir, out_dir = tmp_path / "midi", tmp_path / "out"
    midi_dir.mkdir()
    for seed in range(3):
        small_score(seed).dump_midi(midi_dir / f"{seed}.mid")
    prepare_dataset(midi_dir, out_dir, config(), workers=1, progress=False)
    written = output_bytes(out_dir)
    (pack,) = (out_dir / "cache").rglob("*.pack")
    pack.write_bytes(pack.read_bytes()[:-10])  # as if the run had been killed mid-write
    again = prepare_dataset(midi_dir, out_dir, config(), workers=1, progress=False)
    assert (again.processed, again.cached) == (1, 2)
    assert output_bytes(out_dir) == written


def test_file_system_failures_are_reported_but_not_cached(tmp_path, monkeypatch):
    midi_dir, out_dir = tmp_path / "midi", tmp_path / "out"
    midi_dir.mkdir()
    small_score(0).dump_midi(midi_dir / "kept.mid")
    vanishing = midi_dir / "vanishing.mid"
    small_score(1).dump_midi(vanishing)
    tokenizer, limits = PolyTokenizer.build("remi"), config()
    content_hash = hashlib.sha256(vanishing.read_bytes()).hexdigest()
    changed = process_file(str(vanishing), "0" * 64, tokenizer, limits)
    assert (changed.stage, changed.transient) == ("read", True)
    vanishing.rename(tmp_path / "elsewhere.mid")
    gone = process_file(str(vanishing), content_hash, tokenizer, limits)
    assert (gone.stage, gone.transient) == ("read", True) and "disappeared" in gone.reason
    (tmp_path / "elsewhere.mid").rename(vanishing)

    monkeypatch.setattr(
        isolation,
        "process_file",
        lambda path, *args: gone if path == str(vanishing) else process_file(path, *args),
    )
    first = prepare_dataset(midi_dir, out_dir, limits, workers=0, progress=False)
    assert first.skipped == {"read": 1} and first.ok == 1
    monkeypatch.undo()
    second = prepare_dataset(midi_dir, out_dir, limits, workers=0, progress=False)
    assert (second.processed, second.ok) == (1, 2)  # tried again, not answered from the cache


@pytest.mark.parametrize("kind", ["remi", "cpword"])
def test_shards_hold_exactly_what_the_tokenizer_encodes(kind, request, fixture_midi_dir):
    dataset_dir = request.getfixturevalue(f"prepared_{kind}")
    tokenizer = PolyTokenizer.load(dataset_dir)
    manifest = json.loads((dataset_dir / MANIFEST_FILE).read_text())
    assert manifest["tokenizer_hash"] == tokenizer.hash and manifest["tokenization"] == kind
    fractions = manifest["config"]["validation_fraction"], manifest["config"]["test_fraction"]
    n_pieces = 0
    for split in SPLITS:
        ids = np.load(dataset_dir / split / "ids.npy", mmap_mode="r")
        track_ids = np.load(dataset_dir / split / "track_ids.npy", mmap_mode="r")
        offsets = np.load(dataset_dir / split / "offsets.npy")
        pieces = [json.loads(line) for line in (dataset_dir / split / "pieces.jsonl").open()]
        assert ids.dtype == np.int16 and ids.shape[1:] == tokenizer.ids_shape
        assert track_ids.dtype == np.uint8 and len(track_ids) == len(ids)
        assert offsets.dtype == np.int64 and len(offsets) == len(pieces) + 1
        assert offsets[0] == 0 and offsets[-1] == len(ids)
        assert [p["sha256"] for p in pieces] == sorted(p["sha256"] for p in pieces)
        assert manifest["splits"][split]["tokens"] == len(ids)
        for piece, start, end in zip(pieces, offsets[:-1], offsets[1:], strict=True):
            path = fixture_midi_dir / piece["path"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == piece["sha256"]
            assert split_of(piece["sha256"], *fractions) == split
            assert piece["source"] == piece["path"].split("/")[0]
            encoded = tokenizer.encode(Score(path))
            np.testing.assert_array_equal(ids[start:end], encoded.ids)
            np.testing.assert_array_equal(track_ids[start:end], encoded.track_ids)
            assert tuple(piece["instruments"]) == encoded.instruments
            assert piece["n_tokens"] == end - start
        n_pieces += len(pieces)
    assert n_pieces == manifest["files"]["tokenized"]
    assert sum(s["pieces"] for s in manifest["sources"].values()) == n_pieces


def test_cli_prints_summary_and_exit_codes(clean_dir, tmp_path):
    command = [sys.executable, "-m", "polyphony.data.prepare"]
    ok = subprocess.Popen(
        [*command, str(clean_dir), "--out", str(tmp_path / "out"), "--workers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    missing = subprocess.run(
        [*command, str(tmp_path / "no_such_dir"), "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    stdout, _ = ok.communicate(timeout=120)
    assert ok.returncode == 0
    n_files = sum(p.suffix.lower() in (".mid", ".midi", ".kar") for p in clean_dir.rglob("*"))
    assert f"{n_files} found: {n_files} tokenized, 0 skipped" in stdout
    assert "tokens" in stdout and "instruments" in stdout
    assert (tmp_path / "out" / MANIFEST_FILE).is_file()
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "no_such_dir: MIDI folder not found" in missing.stderr


def test_cli_fails_clearly_when_nothing_can_be_used(tmp_path, capsys):
    no_midi = tmp_path / "no_midi"
    no_midi.mkdir()
    (no_midi / "readme.txt").write_text("hello")
    assert main([str(no_midi), "--out", str(tmp_path / "a"), "--no-progress"]) == 1
    assert "no MIDI files (.mid, .midi, .kar)" in capsys.readouterr().err

    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "noise.mid").write_bytes(bytes(range(256)))
    out_dir = tmp_path / "b"
    assert main([str(only_bad), "--out", str(out_dir), "--workers", "1", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "none of the 1 MIDI files could be tokenized" in err and "noise.mid" in err
    assert [e["path"] for e in read_report(out_dir)] == ["noise.mid"]
    assert not (out_dir / MANIFEST_FILE).exists()  # not a usable dataset

    assert main([str(only_bad), "--data.max_barz=3"]) == 1
    assert "Did you mean max_bars" in capsys.readouterr().err


def test_source_held_out_overrides_the_fractions_for_its_source(fixture_midi_dir, tmp_path):
    """data.source_held_out gives one source its own held-out share; the others keep theirs,
    and every piece's split is still a pure function of its content hash."""
    held_out = {"band": 0.45}
    data_config = config(source_held_out=held_out)
    prepare_dataset(fixture_midi_dir, tmp_path / "ds", data_config, workers=0, progress=False)
    manifest = json.loads((tmp_path / "ds" / MANIFEST_FILE).read_text())
    assert manifest["config"]["source_held_out"] == held_out
    by_source: dict[str, list[str]] = {}
    for split in SPLITS:
        for line in (tmp_path / "ds" / split / "pieces.jsonl").open():
            piece = json.loads(line)
            fraction = held_out.get(piece["source"])
            expected = (
                split_of(piece["sha256"], fraction, fraction)
                if fraction is not None
                else split_of(piece["sha256"], 0.2, 0.1)
            )
            assert split == expected, piece["path"]
            by_source.setdefault(piece["source"], []).append(split)
    assert set(by_source) == {"band", "music21"}
    # The override changed something: some band piece the default fractions would train on
    # is held out now.
    band = [
        json.loads(line)
        for split in SPLITS
        for line in (tmp_path / "ds" / split / "pieces.jsonl").open()
        if json.loads(line)["source"] == "band"
    ]
    moved = [p for p in band if split_of(p["sha256"], 0.2, 0.1) == "train"]
    assert any(split_of(p["sha256"], 0.45, 0.45) != "train" for p in moved)


def test_out_of_range_velocities_and_controllers_are_clamped_and_reported(tmp_path):
    """Kept with a `repaired` line in the report (pitches intact, velocities 127); --strict
    refuses them as before, and a pitch above 127 is never repaired."""
    midi_dir = tmp_path / "midi"
    counts = write_repairable_files(midi_dir)
    (midi_dir / "pitch_200.mid").write_bytes(
        midi_bytes([(0, bytes([0x90, 200, 100])), (480, note_off(60))])
    )
    small_score(0).dump_midi(midi_dir / "good.mid")
    summary = prepare_dataset(midi_dir, tmp_path / "lenient", config(), workers=0, progress=False)
    assert summary.ok == 3 and summary.repaired == 2 and summary.skipped == {"read": 1}
    report = {e["path"]: e for e in read_report(tmp_path / "lenient")}
    assert report["velocity_204.mid"]["stage"] == "repaired"
    assert "velocity 204" in report["velocity_204.mid"]["reason"]
    assert "2 note velocities" in report["velocity_204.mid"]["reason"]
    assert "control_value 168" in report["controller_168.mid"]["reason"]
    assert report["pitch_200.mid"]["stage"] == "read"
    manifest = json.loads((tmp_path / "lenient" / MANIFEST_FILE).read_text())
    assert manifest["files"]["repaired"] == 2
    pieces = [
        json.loads(line)
        for split in SPLITS
        for line in (tmp_path / "lenient" / split / "pieces.jsonl").open()
    ]
    assert {p["path"]: p["n_notes"] for p in pieces if p["path"] in counts} == counts
    score, repair = read_score((midi_dir / "velocity_204.mid").read_bytes())
    assert [n.pitch for n in score.tracks[0].notes] == [60, 61, 62, 63]
    assert sorted(n.velocity for n in score.tracks[0].notes) == [90, 90, 127, 127]
    assert repair.first == "velocity=204" and repair.velocities_at_127 == 2

    strict = prepare_dataset(
        midi_dir, tmp_path / "strict", config(strict=True), workers=0, progress=False
    )
    assert strict.ok == 1 and strict.repaired == 0 and strict.skipped == {"read": 3}
    reasons = {e["path"]: e["reason"] for e in read_report(tmp_path / "strict")}
    assert "drop data.strict" in reasons["velocity_204.mid"]
    assert "re-export it" in reasons["pitch_200.mid"]
