"""Musical metrics, the generation-request marker and the evaluate CLI, on hand-built scores.

Every expected value below is worked out by hand from the definitions in polyphony.metrics.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from symusic import Note, Score, TextMeta, TimeSignature, Track

from polyphony.instruments import InstrumentError
from polyphony.metrics import (
    compute_folder_metrics,
    drum_groove,
    empty_bar_rate,
    groove_consistency,
    instrument_fidelity,
    instruments_present,
    n_bars,
    note_density,
    piece_bar_lines,
    pitch_class_entropy,
    pitch_ranges,
    pitch_recurrence,
    polyphony,
    read_request,
    scale_consistency,
    top_pitch_share,
    write_request,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
TPQ = 480
BAR = 4 * TPQ  # one 4/4 bar in ticks

# (onset, duration, pitch) triples, in ticks
NoteSpec = tuple[int, int, int]


def make_score(
    *tracks: tuple[int, bool, list[NoteSpec]],
    tpq: int = TPQ,
    meter: tuple[int, int] | None = (4, 4),
) -> Score:
    """A score with one track per (program, is_drum, notes)."""
    score = Score(tpq)
    if meter is not None:
        score.time_signatures.append(TimeSignature(0, *meter))
    for program, is_drum, notes in tracks:
        track = Track(program=program, is_drum=is_drum)
        for onset, duration, pitch in notes:
            track.notes.append(Note(onset, duration, pitch, 80))
        score.tracks.append(track)
    return score


def piano(notes: list[NoteSpec]) -> tuple[int, bool, list[NoteSpec]]:
    return (0, False, notes)


def quarters(pitches: list[int], start: int = 0) -> list[NoteSpec]:
    """One quarter note per pitch, back to back."""
    return [(start + i * TPQ, TPQ, pitch) for i, pitch in enumerate(pitches)]


C_MAJOR_SCALE = [60, 62, 64, 65, 67, 69, 71, 72]
DRUM_KIT = (0, True, quarters([35, 38, 42, 46, 49, 51, 56, 61]))  # 8 pitch classes


# ---------------------------------------------------------------------------- pitch metrics


def test_c_major_scale_has_scale_consistency_one():
    assert scale_consistency(make_score(piano(quarters(C_MAJOR_SCALE)))) == 1.0


def test_one_chromatic_note_in_a_scale_lowers_scale_consistency_to_seven_eighths():
    # C D E F G A B + F#: no 7-note scale holds all 8 pitch classes; C major and G major hold 7.
    notes = quarters([60, 62, 64, 65, 67, 69, 71, 66])
    assert scale_consistency(make_score(piano(notes))) == pytest.approx(7 / 8)


def test_a_single_repeated_pitch_class_has_zero_entropy():
    score = make_score(piano(quarters([48, 60, 72, 60, 84])))  # all C
    assert pitch_class_entropy(score) == 0.0


def test_twelve_pitch_classes_equally_often_have_entropy_log2_12():
    score = make_score(piano(quarters(list(range(60, 72)) * 2)))
    assert pitch_class_entropy(score) == pytest.approx(math.log2(12))


def test_pitch_class_entropy_of_a_three_to_one_histogram():
    score = make_score(piano(quarters([60, 60, 72, 67])))  # C three times, G once
    expected = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))  # 0.8113 bits
    assert pitch_class_entropy(score) == pytest.approx(expected)


def test_drums_are_excluded_from_pitch_metrics():
    melody = piano(quarters([60, 72, 60, 48]))
    with_drums = make_score(melody, DRUM_KIT)
    assert pitch_class_entropy(with_drums) == 0.0
    assert scale_consistency(with_drums) == 1.0
    assert polyphony(with_drums) == 1.0
    assert pitch_ranges(with_drums) == {0: (48, 72, 24)}


def test_pitch_metrics_of_a_drums_only_piece_are_undefined():
    drums_only = make_score(DRUM_KIT)
    assert math.isnan(pitch_class_entropy(drums_only))
    assert math.isnan(scale_consistency(drums_only))
    assert math.isnan(polyphony(drums_only))
    assert pitch_ranges(drums_only) == {}


def test_pitch_range_is_per_instrument_and_pools_tracks_of_one_program():
    score = make_score(
        piano(quarters([60, 72])),
        piano(quarters([48, 50])),
        (33, False, quarters([28, 40, 35])),
    )
    assert pitch_ranges(score) == {0: (48, 72, 24), 33: (28, 40, 12)}


def test_a_looped_phrase_recurs_fully_and_a_new_bar_counts_its_shared_share():
    # Bars 0-3 hold C D E F, bars 4-7 repeat them; bar 8 plays C and G: C recurs, G does not.
    phrase = [[60, 62], [64], [65, 67], [69]]
    bars = phrase + phrase + [[60, 71]]
    notes = [(b * BAR + i * TPQ, TPQ, p) for b, bar in enumerate(bars) for i, p in enumerate(bar)]
    bass = [(b * BAR, TPQ, 28 + b) for b in range(9)]  # a new pitch every bar: never recurs
    score = make_score(piano(notes), (33, False, bass), DRUM_KIT)
    figures = pitch_recurrence(score)
    assert set(figures) == {0, 33}  # drums have no pitches to repeat
    assert figures[0] == (7, (4 * 1.0 + 0.5) / 5)
    assert figures[33] == (9, 0.0)


def test_recurrence_skips_silent_bars_and_is_undefined_for_a_short_part():
    rest_then_repeat = [(0, TPQ, 60), (5 * BAR, TPQ, 60)]  # bar 4 silent, bar 5 has no partner
    assert pitch_recurrence(make_score(piano(rest_then_repeat)))[0] == (1, 0.0)
    short = pitch_recurrence(make_score(piano(quarters([60, 62, 64]))))
    assert short[0][0] == 3 and math.isnan(short[0][1])


def test_top_pitch_share_counts_each_instruments_most_frequent_pitch():
    score = make_score(
        piano(quarters([60, 64, 67, 60])),
        piano(quarters([60])),  # a second piano track pools with the first: 3 of 5 on C4
        (33, False, quarters([28, 28, 28, 31])),
        DRUM_KIT,
    )
    assert top_pitch_share(score) == {0: 3 / 5, 33: 3 / 4}  # drums have no pitch to hold
    assert top_pitch_share(score, min_notes=5) == {0: 3 / 5}


def drum_bars(patterns: list[list[tuple[int, int]]]) -> tuple[int, bool, list[NoteSpec]]:
    """A drum track, one bar per pattern of (16th of the bar, kit piece) hits."""
    return (
        0,
        True,
        [(b * BAR + k * TPQ // 4, 60, p) for b, hits in enumerate(patterns) for k, p in hits],
    )


def test_drum_groove_counts_the_hits_struck_at_the_same_place_1_to_4_bars_before():
    a = [(0, 36), (8, 38)]  # kick on beat 1, snare on beat 3
    b = [(0, 36), (4, 42), (8, 38), (12, 42)]  # the same, hats on beats 2 and 4
    assert drum_groove(make_score(drum_bars([a] * 8))) == 1.0
    # Bars 1-3 repeat a (6 hits); bar 4 brings the hats (2 of its 4 new); bars 5-7 repeat b (12).
    assert drum_groove(make_score(drum_bars([a] * 4 + [b] * 4))) == pytest.approx(20 / 22)
    assert drum_groove(make_score(drum_bars([a] * 4 + [b] * 4)), from_bar=4) == 14 / 16
    shifted = [(1, 36), (9, 38)]  # a 16th late: another place in the bar
    assert drum_groove(make_score(drum_bars([a, shifted]))) == 0.0
    swapped = [(0, 35), (8, 40)]  # the same places, other kit pieces
    assert drum_groove(make_score(drum_bars([a, swapped]))) == 0.0
    # Five bars back is out of reach.
    assert drum_groove(make_score(drum_bars([a, [], [], [], [], a]))) == 0.0
    assert math.isnan(drum_groove(make_score(piano(quarters([60, 62])))))  # no drums


# ---------------------------------------------------------------------------- polyphony


def test_a_held_three_note_chord_has_polyphony_three():
    chord = [(0, BAR, 60), (0, BAR, 64), (0, BAR, 67)]
    assert polyphony(make_score(piano(chord))) == 3.0


def test_polyphony_averages_only_over_sounding_time():
    # A triad for one beat, a silent beat, then one note for one beat: (3 + 1) / 2.
    notes = [(0, TPQ, 60), (0, TPQ, 64), (0, TPQ, 67), (2 * TPQ, TPQ, 72)]
    assert polyphony(make_score(piano(notes))) == 2.0


def test_polyphony_counts_a_pitch_doubled_by_two_tracks_once():
    # MusPy's piano roll is per pitch: piano and strings both on C4, plus E4 in the piano.
    score = make_score(piano([(0, BAR, 60), (0, BAR, 64)]), (48, False, [(0, BAR, 60)]))
    assert polyphony(score) == 2.0


# ---------------------------------------------------------------------------- groove


def four_bars_of(pattern_per_bar: list[list[int]]) -> Score:
    """Quarter notes on the given beats (0..3) of consecutive 4/4 bars."""
    notes = [
        (b * BAR + beat * TPQ, TPQ, 60) for b, beats in enumerate(pattern_per_bar) for beat in beats
    ]
    return make_score(piano(notes))


def test_identical_bars_have_groove_consistency_one():
    # The last note ends exactly on the final bar line: no phantom empty bar may be counted.
    assert groove_consistency(four_bars_of([[0, 1, 2, 3]] * 4)) == 1.0


def test_alternating_bars_have_the_hand_computed_groove_consistency():
    # Bars alternate {beats 1,2,3,4} and {beats 1,3}: each of the 3 neighbouring pairs differs
    # in 2 of the 48 grid positions (12 per quarter), so 1 - 6 / (3 * 48) = 23/24.
    score = four_bars_of([[0, 1, 2, 3], [0, 2], [0, 1, 2, 3], [0, 2]])
    assert groove_consistency(score) == pytest.approx(1 - 6 / 144)


def test_groove_uses_the_time_signature_for_bar_lines():
    # One quarter note every three beats repeats exactly in 3/4, not in 4/4.
    notes = [(i * 3 * TPQ, TPQ, 60) for i in range(4)]
    assert groove_consistency(make_score(piano(notes), meter=(3, 4))) == 1.0
    # In 4/4 the onsets fall on beats 0 and 3 of bar 1, beat 2 of bar 2, beat 1 of bar 3:
    # grid positions {0, 36} {24} {12}, distances 3 + 2 = 5 over 2 * 48 positions.
    assert groove_consistency(make_score(piano(notes))) == pytest.approx(1 - 5 / 96)


def test_groove_does_not_depend_on_ticks_per_quarter():
    pattern = [[0, 1, 2, 3], [0, 2], [0, 1, 2, 3], [0, 2]]
    coarse = make_score(
        piano([(b * 64 + beat * 16, 16, 60) for b, beats in enumerate(pattern) for beat in beats]),
        tpq=16,
    )
    assert groove_consistency(coarse) == pytest.approx(groove_consistency(four_bars_of(pattern)))


def test_groove_of_a_one_bar_piece_is_undefined():
    assert math.isnan(groove_consistency(four_bars_of([[0, 1]])))


# ---------------------------------------------------------------------------- bars and density


def test_notes_in_bars_one_and_three_of_four_give_empty_bar_rate_one_half():
    # Bar 3's whole note is held through bar 4, which has no onset of its own.
    notes = [(0, TPQ, 60), (TPQ, TPQ, 62), (2 * BAR, 2 * BAR, 64)]
    score = make_score(piano(notes))
    assert n_bars(score) == 4
    assert empty_bar_rate(score) == 0.5
    assert note_density(score) == 3 / 4


def test_missing_time_signature_means_four_four():
    score = make_score(piano(quarters([60] * 8)), meter=None)
    assert n_bars(score) == 2
    assert note_density(score) == 4.0


def test_bar_metrics_of_an_empty_piece_are_undefined():
    empty = make_score(piano([]))
    assert n_bars(empty) == 0
    assert math.isnan(empty_bar_rate(empty))
    assert math.isnan(note_density(empty))


def test_corrupt_timing_is_refused_by_metrics_and_reported_by_folders(tmp_path):
    # One note 100 million ticks in at 16 ticks per quarter: 1.5 million bars.
    runaway = make_score(piano([(0, 16, 60), (100_000_000, 16, 60)]), tpq=16)
    with pytest.raises(ValueError, match="timing is probably corrupt"):
        n_bars(runaway)
    write_folder(tmp_path, {"runaway.mid": runaway, "fine.mid": make_score(piano(quarters([60])))})
    folder = compute_folder_metrics(tmp_path, progress=False)
    assert [piece["file"] for piece in folder["pieces"]] == ["fine.mid"]
    assert [failure["file"] for failure in folder["failed"]] == ["runaway.mid"]
    assert "corrupt" in folder["failed"][0]["error"]


# ---------------------------------------------------------------------------- instruments


def test_instruments_present_counts_programs_with_notes_and_one_drum_kit():
    score = make_score(
        piano(quarters([60])),
        piano(quarters([64])),  # a second piano track is the same instrument
        (33, False, quarters([40])),
        (40, False, []),  # a violin track without notes does not play
        DRUM_KIT,
        (25, True, quarters([36])),  # a drum track with another program is still drums
    )
    assert instruments_present(score) == [0, 33, 128]


def fidelity_of(requested: list[int], *tracks) -> dict:
    score = make_score(*tracks)
    write_request(score, requested)
    return instrument_fidelity(score)


def test_fidelity_precision_and_recall_on_hand_made_cases():
    bass, violin = (33, False, quarters([40])), (40, False, quarters([76]))
    exact = fidelity_of([0, 33, 128], piano(quarters([60])), bass, DRUM_KIT)
    assert (exact["precision"], exact["recall"]) == (1.0, 1.0)
    # asked piano, bass, drums; played piano, bass, violin: 2 of 3 right, 2 of 3 delivered
    swapped = fidelity_of([0, 33, 128], piano(quarters([60])), bass, violin)
    assert (swapped["precision"], swapped["recall"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    # asked piano only; played piano and violin
    extra = fidelity_of([0], piano(quarters([60])), violin)
    assert (extra["precision"], extra["recall"]) == (0.5, 1.0)
    silent = fidelity_of([0, 33], piano([]))
    assert (silent["precision"], silent["recall"]) == (0.0, 0.0)


def test_fidelity_is_none_without_a_request():
    assert instrument_fidelity(make_score(piano(quarters([60])))) is None


# ---------------------------------------------------------------------------- request marker


def test_request_marker_round_trips_through_a_midi_file(tmp_path):
    score = make_score(piano(quarters([60])), DRUM_KIT)
    write_request(score, [0, 33, 128])
    write_request(score, [0, 128, 33])  # writing again replaces the request
    path = tmp_path / "generated.mid"
    score.dump_midi(path)
    reloaded = Score(path)
    assert read_request(reloaded) == [0, 128, 33]
    markers = [(m.time, m.text) for m in reloaded.markers]
    assert markers == [(0, "polyphony:instruments=0,128,33")]


def test_a_score_without_marker_has_no_request():
    assert read_request(make_score(piano(quarters([60])))) is None


def test_malformed_requests_are_rejected():
    score = make_score(piano(quarters([60])))
    with pytest.raises(InstrumentError):
        write_request(score, [0, 129])
    score.markers.append(TextMeta(0, "polyphony:instruments=piano,bass"))
    with pytest.raises(ValueError, match="malformed marker"):
        read_request(score)


# ---------------------------------------------------------------------------- folders and CLI


def write_folder(folder: Path, pieces: dict[str, Score]) -> None:
    for name, score in pieces.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        score.dump_midi(path)


def test_extra_piece_metrics_are_aggregated_like_built_in_ones(tmp_path):
    write_folder(
        tmp_path,
        {
            "a.mid": make_score(piano(quarters([60]))),
            "b.mid": make_score(piano(quarters([60, 62, 64]))),
        },
    )
    folder = compute_folder_metrics(
        tmp_path,
        extra_piece_metrics=lambda score: {"notes": float(score.note_num())},
        progress=False,
    )
    assert folder["metrics"]["notes"] == {"mean": 2.0, "std": 1.0, "n": 2}
    assert [piece["notes"] for piece in folder["pieces"]] == [1.0, 3.0]


def test_evaluate_cli_prints_the_table_writes_json_and_reports_corrupt_files(tmp_path):
    generated, reference = tmp_path / "generated", tmp_path / "reference"
    in_key = make_score(piano(quarters(C_MAJOR_SCALE)), (33, False, quarters([36, 43])))
    write_request(in_key, [0, 33])  # delivered exactly
    chromatic = make_score(piano(quarters([60, 62, 64, 65, 67, 69, 71, 66])))
    write_request(chromatic, [0, 128])  # drums missing: precision 1, recall 1/2
    write_folder(generated, {"in_key.mid": in_key, "sub/chromatic.MIDI": chromatic})
    (generated / "corrupt.mid").write_bytes(b"this is not a MIDI file")
    (generated / "notes.txt").write_text("not MIDI, not counted")
    write_folder(reference, {"real.mid": make_score(piano(quarters(C_MAJOR_SCALE)))})

    out = tmp_path / "report.json"
    command = [sys.executable, "-m", "polyphony.evaluate", str(generated)]
    command += ["--reference", str(reference), "--json", str(out)]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr

    assert "scale consistency" in result.stdout
    assert "corrupt.mid" in result.stdout
    assert "1 unreadable file skipped" in result.stdout
    # generated scale consistency 1 and 7/8 -> 0.9375 ± 0.0625; reference 1.0; gap -6.25 %
    row = next(line for line in result.stdout.splitlines() if line.startswith("scale consistency"))
    assert row.split()[2:] == ["0.938", "±", "0.062", "2", "1.000", "±", "0.000", "1", "-6.2%"]

    report = json.loads(out.read_text())
    assert set(report) == {"generated", "reference", "gap_percent"}
    gen = report["generated"]
    assert {
        "folder",
        "n_files",
        "n_pieces",
        "failed",
        "metrics",
        "pitch_range",
        "fidelity",
        "pieces",
    } <= set(gen)
    assert (gen["n_files"], gen["n_pieces"]) == (3, 2)
    assert [f["file"] for f in gen["failed"]] == ["corrupt.mid"]
    assert [p["file"] for p in gen["pieces"]] == ["in_key.mid", "sub/chromatic.MIDI"]
    assert gen["metrics"]["scale_consistency"] == {"mean": 0.9375, "std": 0.0625, "n": 2}
    assert report["reference"]["metrics"]["scale_consistency"]["mean"] == 1.0
    assert report["gap_percent"]["scale_consistency"] == pytest.approx(-6.25)
    assert gen["metrics"]["n_instruments"]["mean"] == 1.5
    assert gen["pitch_range"]["33"]["span"]["mean"] == 7
    # fidelity: macro precision (1 + 1) / 2, recall (1 + 1/2) / 2; micro recall 3 of 4 requested
    assert gen["fidelity"]["macro"]["precision"]["mean"] == 1.0
    assert gen["fidelity"]["macro"]["recall"]["mean"] == 0.75
    assert gen["fidelity"]["micro"] == {"precision": 1.0, "recall": 0.75}
    assert report["reference"]["fidelity"] is None


def test_evaluate_cli_refuses_a_folder_without_midi_files(tmp_path):
    command = [sys.executable, "-m", "polyphony.evaluate", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "no .mid or .midi files" in result.stderr


def test_a_piece_ending_on_a_bar_line_has_no_bar_after_it():
    # Two whole bars that end exactly on the third bar line; then the same with a zero-length
    # note struck on that line, which opens a third bar.
    ending_on_the_line = make_score(piano([(0, BAR, 60), (BAR, BAR, 62)]))
    assert n_bars(ending_on_the_line) == 2
    starts, lengths = piece_bar_lines(ending_on_the_line)
    assert starts.tolist() == [0, BAR] and lengths.tolist() == [BAR, BAR]
    struck_on_the_line = make_score(piano([(0, BAR, 60), (BAR, BAR, 62), (2 * BAR, 0, 64)]))
    assert len(piece_bar_lines(struck_on_the_line)[0]) == n_bars(struck_on_the_line) == 3
