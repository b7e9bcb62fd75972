"""Hostile MIDI on the generation path: every kind of file prepare's tests build, and the ones
that make a naive reader work without bound, given to generate() as a prompt, as a piece to
arrange and as a piece to infill. Each ends in a Score or a one-line GenerationError naming the file, within the stated
time limit; none raises anything else."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from adversarial import (
    write_adversarial_files,
    write_generation_hostile_files,
    write_repairable_files,
)
from symusic import Score

from polyphony.generation import GenerationError, generate, load_checkpoint

TIME_LIMIT_S = 4.0
# Reading and validating before decoding starts is bounded by the input limits, not the clock:
# what a refusal may take on a busy 2-core machine, on top of the time limit.
READ_ALLOWANCE_S = 8.0


@pytest.fixture(scope="module")
def hostile_dir(fixture_midi_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    directory = tmp_path_factory.mktemp("hostile_generation")
    good = sorted((fixture_midi_dir / "band").glob("*.mid"))[0]
    names = set(write_adversarial_files(directory, good))
    names |= set(write_generation_hostile_files(directory))
    names |= set(write_repairable_files(directory))
    shutil.rmtree(directory / "folder.mid")  # a folder: the CLI's file check covers it
    return directory, sorted(names)


@pytest.fixture(scope="module")
def checkpoint():
    return load_checkpoint()


@pytest.mark.parametrize("mode", ["prompt", "arrange", "infill"])
def test_every_hostile_file_ends_in_a_score_or_one_line_within_the_bound(
    mode, hostile_dir, checkpoint
):
    directory, names = hostile_dir
    outcomes = {}
    for name in names:
        path = directory / name
        request = {
            "prompt": {"prompt": path, "prompt_bars": 2, "bars": 2},
            "arrange": {"arrange": path, "add": "drums"},
            "infill": {"infill": path, "infill_bars": "1"},
        }[mode]
        started = time.monotonic()
        try:
            result = generate(**request, checkpoint=checkpoint, seed=0, time_limit=TIME_LIMIT_S)
            assert isinstance(result, Score) and result.note_num() > 0, name
            outcomes[name] = "score"
        except GenerationError as err:
            message = str(err)
            assert len(message.splitlines()) == 1, (name, message)
            assert message.startswith(str(path)), (name, message)
            outcomes[name] = message
        elapsed = time.monotonic() - started
        assert elapsed < TIME_LIMIT_S + READ_ALLOWANCE_S, (name, elapsed)
    # The refusals are the ones a reader must refuse, with the reason prepare gives.
    assert "0 ticks per quarter" in outcomes["tpq_zero.mid"]
    assert "negative tick" in outcomes["tick_overflow.mid"]
    assert "pitch 200 is outside" in outcomes["pitch_200.mid"]
    assert "data.max_bars" in outcomes["max_vlq_delta.mid"]
    assert "data.max_bars" in outcomes["note_ending_far_beyond.mid"]
    assert "more than one request may force" in outcomes["chord_100k_notes_one_tick.mid"]
    assert "not a regular file" in outcomes["named_pipe.mid"]
    # Out-of-range velocities and controller values are clamped, and the music used.
    assert outcomes["velocity_204.mid"] == outcomes["controller_168.mid"] == "score"


def test_a_piece_longer_than_one_request_arranges_is_refused_before_decoding(
    hostile_dir, checkpoint
):
    directory, _ = hostile_dir
    path = directory / "note_997_huge_gap.mid"  # ~1,800 bars: valid, but too long
    started = time.monotonic()
    with pytest.raises(GenerationError, match=r"bars, more than one request arranges \(512\)"):
        generate(arrange=path, add="drums", checkpoint=checkpoint, seed=0)
    assert time.monotonic() - started < READ_ALLOWANCE_S


def test_the_time_limit_stops_decoding_with_one_line(checkpoint):
    started = time.monotonic()
    with pytest.raises(GenerationError, match="stopped after the time limit of 0.5 s"):
        generate("piano, bass, drums", bars=64, checkpoint=checkpoint, seed=0, time_limit=0.5)
    assert time.monotonic() - started < 0.5 + READ_ALLOWANCE_S


@pytest.mark.parametrize(
    "name", ["tpq_zero.mid", "chord_100k_notes_one_tick.mid", "named_pipe.mid", "truncated.mid"]
)
def test_generate_py_exits_2_with_one_line_on_a_hostile_file(hostile_dir, name, capsys, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "generate_cli", Path(__file__).resolve().parents[1] / "generate.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    directory, _ = hostile_dir
    out = tmp_path / "out.mid"
    code = module.main(
        ["--prompt", str(directory / name), "--bars", "2", "-o", str(out), "--quiet"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert name in err and not out.exists()
