"""The full-parts evaluation's measurements (polyphony/parts/) on scores built by hand."""

from __future__ import annotations

import json

import pytest
from symusic import Note, Score, Tempo, TimeSignature, Track

from polyphony import generation
from polyphony.generation import load_checkpoint
from polyphony.instruments import DRUMS
from polyphony.metrics import write_request
from polyphony.parts import (
    excerpt,
    family_medians,
    format_report,
    gap_intervals,
    part_figures,
    report_family,
    requests_from_excerpts,
)
from polyphony.parts.figures import register_kept, register_summary, share_gaps

TPQ = 480
BAR = 4 * TPQ


def piece(parts: dict[int, list[int]], bars: int = 8) -> Score:
    """4/4 at 100 bpm; ``parts``: instrument -> notes per bar (quarter notes from the downbeat)."""
    score = Score(TPQ)
    score.tempos.append(Tempo(0, 100.0))
    score.time_signatures.append(TimeSignature(0, 4, 4))
    for instrument, per_bar in parts.items():
        track = Track(program=0 if instrument == DRUMS else instrument, is_drum=instrument == DRUMS)
        for bar in range(bars):
            for k in range(per_bar[bar % len(per_bar)]):
                pitch = 36 + k if instrument == DRUMS else 48 + 2 * k
                track.notes.append(Note(bar * BAR + k * TPQ // 2, TPQ // 2, pitch, 90))
        score.tracks.append(track)
    return score


def test_an_excerpt_is_the_bars_asked_for_moved_to_zero():
    score = piece({0: [1, 2, 3, 4], 33: [2]}, bars=12)
    cut = excerpt(score, 4, 4)
    assert cut.tempos[0].time == 0 and cut.tempos[0].qpm == pytest.approx(100.0)
    assert (cut.time_signatures[0].numerator, cut.time_signatures[0].denominator) == (4, 4)
    counts = {t.program: t.note_num() for t in cut.tracks}
    assert counts == {0: 1 + 2 + 3 + 4, 33: 8}  # bars 4..7 of the 1-2-3-4 cycle
    assert min(n.time for t in cut.tracks for n in t.notes) == 0
    assert max(n.time for t in cut.tracks for n in t.notes) < 4 * BAR
    assert excerpt(score, 10, 4) is None  # past the end
    assert excerpt(score, 8, 4) is not None  # the last four bars exactly


def test_part_figures_count_thin_parts_and_family_medians():
    real = piece({0: [4], 33: [2], DRUMS: [8]})
    generated = piece({0: [6], 33: [0, 0, 0, 1], DRUMS: [8]})  # bass: 2 notes in 8 bars
    write_request(generated, [0, 33, DRUMS])
    figures = part_figures([(generated, real)], n_bars=8, asked=[{0: 5.0, 33: 3.0, 34: 4.0}])
    assert figures["asked"]["median_per_family"] == {"bass": 3.5, "piano/keys": 5.0}
    assert figures["real"]["thin_fraction"] == 0.0
    assert figures["generated"]["thin_fraction"] == pytest.approx(1 / 3)  # the bass, 0.25/bar
    assert figures["generated"]["median_per_family"] == {
        "bass": 0.25,
        "drums": 8.0,
        "piano/keys": 6.0,
    }
    assert figures["real"]["median_per_family"] == {"bass": 2.0, "drums": 8.0, "piano/keys": 4.0}
    assert figures["precision"] == figures["recall"] == 1.0


def test_family_medians_count_every_part_of_real_excerpts_per_bar():
    excerpts = [
        ("a.mid@0", piece({0: [4], 33: [2]})),
        ("b.mid@0", piece({0: [8], 33: [6], DRUMS: [8]})),
        ("c.mid@8", piece({33: [1, 0]})),  # half a note a bar
    ]
    assert family_medians(excerpts, n_bars=8) == {"bass": 2.0, "drums": 8.0, "piano/keys": 6.0}


def test_the_report_sets_each_family_gap_beside_the_training_pieces_own():
    """The training pieces' excerpts against the same real ones: bass 3 against 2 is +50 %."""
    real, generated = piece({0: [4], 33: [2]}), piece({0: [6], 33: [3]})
    write_request(generated, [0, 33])
    requests = part_figures([(generated, real)], n_bars=8)
    trained = [("t.mid@0", piece({0: [5], 33: [3]}))]
    requests["training"] = {"median_per_family": family_medians(trained, 8)}
    continuation = {"pieces": 1, "prompt_tracks": 2, "median_ratio": 1.0, "silent_fraction": 0.0}
    report = {
        "excerpts": 1, "requests": requests, "control": {}, "continuation": continuation,
        "arrangement": {},
    }  # fmt: skip
    rows = {line.split(" (")[0]: line.split() for line in format_report(report).splitlines()}
    assert rows["bass"][-2:] == ["3.00", "+50%"]
    assert rows["piano/keys"][-2:] == ["5.00", "+25%"]


def test_a_family_gap_interval_spans_what_the_choice_of_pieces_makes_of_it():
    # Piece "a": three synths playing half of what they really play; "b": one synth playing
    # exactly; "c": one synth playing double. The bass plays 1.5x its part in every piece.
    real = [(81, 8.0)] * 3 + [(81, 4.0), (81, 2.0)] + [(33, 4.0)] * 3
    generated = [(81, 4.0)] * 3 + [(81, 4.0), (81, 4.0)] + [(33, 6.0)] * 3
    pieces = ["a", "a", "a", "b", "c", "a", "b", "c"]
    intervals = gap_intervals(generated, real, pieces, draws=400)
    assert intervals["bass"] == (0.5, 0.5)  # the same gap whichever pieces are drawn
    low, high = intervals["synth"]
    point = 4.0 / 8.0 - 1  # the median over the five synths: generated 4, real 8
    assert low <= point <= high
    # -0.5 whenever "a" is drawn (19 draws in 27); +1.0 when "c" is drawn twice or more (4 in 27).
    assert low == pytest.approx(-0.5) and high == pytest.approx(1.0)
    assert gap_intervals(generated, real, pieces, draws=400) == intervals  # seeded


def test_a_larger_held_out_share_holds_out_the_same_pieces_and_more(tmp_path):
    """Pieces split by content hash as prepare splits them: hash 0.0 is held out at any share,
    0.25 above a share of 0.125 (validation + test > 0.25), 0.9 never. The gaps are the
    training pieces' family medians against the held-out ones, whatever split the dataset has."""
    basses = {"00": 2, "40": 4, "e6": 6}  # first hash byte -> bass notes per bar
    for split in ("train", "validation", "test"):
        (tmp_path / "data" / split).mkdir(parents=True)
        (tmp_path / "data" / split / "pieces.jsonl").write_text("")
    lines = []
    for byte, per_bar in basses.items():
        path = f"band/{byte}.mid"
        (tmp_path / "band").mkdir(exist_ok=True)
        piece({33: [per_bar], 0: [4]}).dump_midi(str(tmp_path / path))
        lines.append(json.dumps({"sha256": byte + "0" * 62, "path": path, "source": "band"}))
    (tmp_path / "data" / "train" / "pieces.jsonl").write_text("\n".join(lines) + "\n")
    table = share_gaps(tmp_path / "data", tmp_path, [0.1, 0.2], n_bars=8, per_piece=1, stride=8)
    assert table["0.1"]["held_out_pieces"] == 1 and table["0.2"]["held_out_pieces"] == 2
    assert table["0.1"]["gap_per_family"] == {"bass": 1.5, "piano/keys": 0.0}  # 5 against 2
    assert table["0.2"]["gap_per_family"] == {"bass": 1.0, "piano/keys": 0.0}  # 6 against 3


def test_requests_report_each_family_gap_with_its_interval_over_pieces():
    real = piece({0: [4], 33: [2]})
    generated = piece({0: [6], 33: [2]})
    write_request(generated, [0, 33])
    pairs = [(generated, real), (generated.copy(), real.copy())]
    figures = part_figures(pairs, n_bars=8, pieces=["x", "y"])
    assert figures["gap_interval_per_family"] == {"bass": (0.0, 0.0), "piano/keys": (0.5, 0.5)}
    assert "gap_interval_per_family" not in part_figures(pairs, n_bars=8)


def test_a_continued_track_is_measured_against_the_register_of_its_prompt():
    prompt = piece({0: [4], 33: [1], DRUMS: [8]}, bars=4)  # piano 48..54, bass: 4 notes only
    new = piece({0: [4], 33: [2], DRUMS: [8]}, bars=4)
    for note in list(new.tracks[0].notes)[:4]:  # the first bar's 48..54 an octave up: 60..66
        note.pitch += 12
    kept = register_kept(prompt, new)
    # The bass has too few prompt notes to judge; the drums have no register.
    assert len(kept) == 1
    move, outside, notes = kept[0]
    assert (outside, notes) == (4, 16)  # above the prompt's 48..54 + 2
    assert move == 1.0  # the median: 51 in the prompt, 52 with the four raised
    # Two tracks of one program are one part to the model, and to the measurement.
    split = prompt.copy()
    piano = split.tracks[0]
    second = Track(program=0)
    for note in list(piano.notes)[1::2]:
        second.notes.append(Note(note.time, note.duration, note.pitch, note.velocity))
    piano.notes = [n for k, n in enumerate(piano.notes) if k % 2 == 0]
    split.tracks.append(second)
    assert register_kept(split, new) == kept
    summary = register_summary(kept + [(7.0, 0, 4)])
    assert summary["tracks"] == 2 and summary["moved_fraction"] == 0.5
    assert summary["median_move"] == 4.0 and summary["outside_prompt_range"] == 4 / 20


def test_a_requested_part_that_stays_silent_counts_as_zero():
    real = piece({0: [4], 40: [3]})
    generated = piece({0: [4]})
    write_request(generated, [0, 40])
    figures = part_figures([(generated, real)], n_bars=8)
    assert figures["generated"]["median_per_family"]["strings"] == 0.0
    assert figures["generated"]["thin_fraction"] == 0.5
    assert figures["recall"] == 0.5


def test_part_figures_report_how_each_family_repeats_its_phrases():
    real = piece({0: [4], 33: [2], DRUMS: [8]})  # the same pitches every bar: recurrence 1
    generated = piece({0: [4], DRUMS: [8]})
    wandering = Track(program=33)
    for bar in range(8):  # a new pair of pitches every bar: never heard 4 bars back
        wandering.notes.extend(Note(bar * BAR + k * TPQ, TPQ, 28 + 2 * bar + k, 90) for k in (0, 1))
    generated.tracks.append(wandering)
    figures = part_figures([(generated, real)], n_bars=8)
    assert figures["real"]["recurrence_per_family"] == {"bass": 1.0, "piano/keys": 1.0}
    assert figures["generated"]["recurrence_per_family"] == {"bass": 0.0, "piano/keys": 1.0}
    assert figures["real"]["distinct_pitches_per_family"] == {"bass": 2, "piano/keys": 4}
    assert figures["generated"]["distinct_pitches_per_family"] == {"bass": 16, "piano/keys": 4}


def test_part_figures_count_a_part_stuck_on_one_pitch_as_a_pedal():
    real = piece({0: [4], 33: [2]})  # the piano's 4 pitches and the bass's 2 alike each bar
    generated = piece({0: [4]})
    pedal = Track(program=33)  # 15 notes on E1 and one on G1: a pedal
    pedal.notes.extend(Note(k * TPQ, TPQ, 28 if k != 7 else 31, 90) for k in range(16))
    generated.tracks.append(pedal)
    figures = part_figures([(generated, real)], n_bars=8)
    assert figures["real"]["top_pitch_share_per_family"] == {"bass": 0.5, "piano/keys": 0.25}
    assert figures["generated"]["top_pitch_share_per_family"] == {
        "bass": 15 / 16,
        "piano/keys": 0.25,
    }
    assert figures["real"]["pedal_fraction_per_family"] == {"bass": 0.0, "piano/keys": 0.0}
    assert figures["generated"]["pedal_fraction_per_family"] == {"bass": 1.0, "piano/keys": 0.0}
    assert figures["generated"]["pedal_fraction"] == 0.5


def test_part_figures_report_where_each_family_plays():
    """The real bass plays 48 and 50 every bar; the generated one those for 6 bars and two
    octaves up (72, 74) for 2: a quarter of its notes lie outside the real notes' 1st-99th
    percentile, and its median pitch moves up by one step (48 x 6, 50 x 6, 72 x 2, 74 x 2: 50);
    the drums have no register."""
    real = piece({33: [2], DRUMS: [8]})
    generated = piece({DRUMS: [8]})
    high = Track(program=33)
    for bar in range(8):
        pitches = (72, 74) if bar >= 6 else (48, 50)
        high.notes.extend(Note(bar * BAR + k * TPQ, TPQ, p, 90) for k, p in enumerate(pitches))
    generated.tracks.append(high)
    figures = part_figures([(generated, real)], n_bars=8)
    assert figures["generated"]["out_of_register_per_family"] == {"bass": 0.25}
    assert figures["real"]["out_of_register_per_family"] == {"bass": 0.0}
    assert figures["generated"]["median_pitch_per_family"] == {"bass": 50.0}
    assert figures["real"]["median_pitch_per_family"] == {"bass": 49.0}


def test_report_families_cover_every_instrument():
    families = {report_family(i) for i in range(129)}
    assert families == {
        "drums",
        "bass",
        "piano/keys",
        "guitar",
        "strings",
        "brass/reed",
        "synth",
        "other",
    }
    assert report_family(33) == "bass" and report_family(DRUMS) == "drums"


def test_requests_asked_at_the_real_density_ask_each_part_for_what_it_plays(monkeypatch):
    """``asked="real"``: generate() is given each part's notes per bar in the real excerpt (not
    the default, which would ask 1 for the sparse piano and ~15 for the drums), and the report's
    asked medians are those densities."""
    real = piece({0: [1, 0], 33: [3], DRUMS: [6]}, bars=4)  # piano 0.5, bass 3, drums 6 per bar
    given, real_generate = [], generation.generate

    def recording(*args, **kwargs):
        given.append(kwargs["density"])
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(generation, "generate", recording)
    figures = requests_from_excerpts(load_checkpoint(), [("piece", real)], 4, 0, asked="real")
    assert given == [{0: 0.5, 33: 3.0, DRUMS: 6.0}]
    assert figures["asked"]["median_per_family"] == figures["real"]["median_per_family"]
    assert figures["real"]["median_per_family"] == {"bass": 3.0, "drums": 6.0, "piano/keys": 0.5}
    with pytest.raises(ValueError, match="one of default, real, flat"):
        requests_from_excerpts(load_checkpoint(), [("piece", real)], 4, 0, asked="median")
