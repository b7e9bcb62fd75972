"""Infilling (generation/infill.py) with the shipped model on real fixture pieces: everything
outside the region is kept bar-exactly, a track-restricted infill touches only its tracks, the
region keeps its length, regions at either end work, and bad regions get one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from symusic import Score

from polyphony.generation import GenerationError, generate, load_checkpoint
from polyphony.instruments import DRUMS, program_to_instrument
from polyphony.metrics import bar_lines, notes_by_instrument, piece_bar_lines

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint():
    return load_checkpoint()


@pytest.fixture(scope="module")
def pieces(fixture_midi_dir, checkpoint, tmp_path_factory) -> list[tuple[Path, Score, list]]:
    """Band fixtures, each cut to its first 12 bars: (path, quantised score, bar start ticks)."""
    directory = tmp_path_factory.mktemp("infill")
    out = []
    for path in sorted((fixture_midi_dir / "band").glob("*.mid")):
        score = Score(str(path))
        starts = piece_bar_lines(score)[0]
        if len(starts) < 13:
            continue
        short = directory / path.name
        score.clip(0, int(starts[12]), clip_end=True).dump_midi(short)
        quantised = checkpoint.tokenizer.decode(checkpoint.tokenizer.encode(Score(str(short))).ids)
        out.append((short, quantised, piece_bar_lines(quantised)[0]))
    assert len(out) >= 3, "the band fixtures should give several 12-bar pieces"
    return out


def split(notes, begin, end):
    inside = {i: [n for n in rows if begin <= n[0] < end] for i, rows in notes.items()}
    outside = {i: [n for n in rows if not begin <= n[0] < end] for i, rows in notes.items()}
    return inside, outside


def check_infill(original: Score, starts, result: Score, first: int, last: int, redone):
    """Outside bars first..last every note is the original's; inside, the tracks not redone
    keep theirs; new notes start and end inside the region."""
    begin = int(starts[first - 1])
    end = int(starts[last]) if last < len(starts) else 10**12
    before_in, before_out = split(notes_by_instrument(original), begin, end)
    after_in, after_out = split(notes_by_instrument(result), begin, end)
    for instrument in set(before_out) | set(after_out):
        assert before_out.get(instrument, []) == after_out.get(instrument, []), instrument
    for instrument in set(before_in) | set(after_in):
        if instrument in redone:
            assert all(n[0] + n[1] <= end for n in after_in.get(instrument, [])), "rings on"
        else:
            assert before_in.get(instrument, []) == after_in.get(instrument, []), instrument
    # No note rings past the piece's last bar (ending on its bar line is in it).
    result_end = max(t.end() for t in result.tracks if t.notes)
    assert len(bar_lines(result, result.ticks_per_quarter, result_end)[0]) <= len(starts)


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_property_everything_outside_the_region_is_kept_bar_exactly(data, pieces, checkpoint):
    path, original, starts = data.draw(st.sampled_from(pieces))
    n_bars = 12
    first = data.draw(st.integers(1, n_bars))
    last = data.draw(st.integers(first, min(n_bars, first + 3)))
    result = generate(
        infill=path,
        infill_bars=(first, last),
        checkpoint=checkpoint,
        seed=data.draw(st.integers(0, 99)),
    )
    redone = {program_to_instrument(t.program, t.is_drum) for t in original.tracks}
    check_infill(original, starts, result, first, last, redone)


def test_a_track_restricted_infill_touches_only_its_tracks(pieces, checkpoint):
    path, original, starts = next(p for p in pieces if DRUMS in notes_by_instrument(p[1]))
    result = generate(infill=path, infill_bars="5-8", tracks="drums", checkpoint=checkpoint, seed=1)
    check_infill(original, starts, result, 5, 8, {DRUMS})
    begin, end = int(starts[4]), int(starts[8])
    drums_in = [n for n in notes_by_instrument(result)[DRUMS] if begin <= n[0] < end]
    assert drums_in, "the drums play in the region they were asked to fill"


@pytest.mark.parametrize("bars", [(1, 3), (10, 12)])
def test_regions_at_the_start_and_the_end_keep_the_piece_whole(pieces, checkpoint, bars):
    path, original, starts = pieces[0]
    result = generate(infill=path, infill_bars=bars, checkpoint=checkpoint, seed=2)
    redone = {program_to_instrument(t.program, t.is_drum) for t in original.tracks}
    check_infill(original, starts, result, *bars, redone)
    begin = int(starts[bars[0] - 1])
    end = int(starts[bars[1]]) if bars[1] < len(starts) else 10**12
    inside, _ = split(notes_by_instrument(result), begin, end)
    assert sum(map(len, inside.values())) > 0, "the region is filled"


def test_a_new_track_plays_in_the_region_only(pieces, checkpoint):
    path, original, starts = pieces[1]
    present = set(notes_by_instrument(original))
    new = next(i for i in (73, 56, 71, 40) if i not in present)  # flute, trumpet, ...
    result = generate(infill=path, infill_bars="4-6", tracks=[new], checkpoint=checkpoint, seed=3)
    check_infill(original, starts, result, 4, 6, {new})
    played = notes_by_instrument(result)[new]
    assert played and all(starts[3] <= n[0] < starts[6] for n in played)


def test_a_region_outside_the_piece_is_one_line(pieces, checkpoint):
    path, _, _ = pieces[0]
    with pytest.raises(GenerationError, match=r"outside the piece, which has 12 bar\(s\)") as err:
        generate(infill=path, infill_bars="11-14", checkpoint=checkpoint)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    for bad in ("0-2", "5-3", "nine"):
        with pytest.raises(GenerationError, match="--infill-bars"):
            generate(infill=path, infill_bars=bad, checkpoint=checkpoint)
    with pytest.raises(GenerationError, match="--infill keeps"):
        generate(infill=path, infill_bars="1-2", instruments="piano", checkpoint=checkpoint)


def test_the_cli_infills_a_file(pieces, tmp_path):
    path, original, starts = pieces[2]
    out = tmp_path / "filled.mid"
    done = subprocess.run(
        [sys.executable, str(REPO / "generate.py"), "--infill", str(path), "--infill-bars", "3-4",
         "--seed", "0", "-o", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    redone = {program_to_instrument(t.program, t.is_drum) for t in original.tracks}
    check_infill(original, starts, Score(str(out)), 3, 4, redone)
