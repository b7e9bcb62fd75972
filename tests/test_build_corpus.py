"""The corpus builder: WAD and .deb extraction, deduplication, the music21 program plan."""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import struct
import tarfile
import time
from pathlib import Path

import pytest
from symusic import Note, Score, Tempo, Track

from polyphony import corpus
from polyphony.corpus import (
    CorpusError,
    ProgramRequest,
    assign_programs,
    build_debian,
    corpus_stats,
    licence_from_copyright,
    read_ar,
    run_isolated,
    unpack_deb,
    wad_midi_lumps,
)

FIXTURES = Path(__file__).parent / "fixtures" / "midi"


def midi_bytes(pitch: int = 60, drums: bool = False, notes: int = 4) -> bytes:
    score = Score(480)
    score.tempos.append(Tempo(0, 120.0))
    track = Track(name="t", program=0 if drums else 33, is_drum=drums)
    track.notes.extend(Note(i * 480, 240, pitch + i, 90) for i in range(notes))
    score.tracks.append(track)
    return score.dumps_midi()


def make_wad(lumps: list[tuple[str, bytes]], kind: bytes = b"PWAD") -> bytes:
    """A Doom WAD: header, lump data, then the directory (as id Software's tools write it)."""
    data = b""
    entries = []
    for name, content in lumps:
        entries.append(struct.pack("<ii8s", 12 + len(data), len(content), name.encode()))
        data += content
    return struct.pack("<4sii", kind, len(lumps), 12 + len(data)) + data + b"".join(entries)


def make_ar(members: list[tuple[str, bytes]]) -> bytes:
    out = b"!<arch>\n"
    for name, content in members:
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(content):<10}`\n"
        out += header.encode() + content + (b"\n" if len(content) % 2 else b"")
    return out


def make_tar_xz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def make_deb(package: str, files: dict[str, bytes], version: str = "1.2-3") -> bytes:
    control = f"Package: {package}\nVersion: {version}\nArchitecture: all\n".encode()
    return make_ar(
        [
            ("debian-binary", b"2.0\n"),
            ("control.tar.xz", make_tar_xz({"control": control})),
            ("data.tar.xz", make_tar_xz(files)),
        ]
    )


DEP5_COPYRIGHT = b"""Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: x

Files: *
Copyright: 2001 Somebody
License: GPL-2+

Files: debian/*
License: MIT
"""


# --- WAD ----------------------------------------------------------------------------------------


def test_wad_music_lumps_are_the_midi_d_lumps_only():
    song, other = midi_bytes(60), midi_bytes(70)
    wad = make_wad(
        [
            ("PLAYPAL", b"\x00" * 30),
            ("D_E1M1", song),
            ("D_E1M2", b"MUS\x1a" + b"\x00" * 20),  # Doom's own MUS format: not MIDI
            ("DEMO1", other),  # MIDI bytes, but not a music lump
            ("D_RUNNIN", other),
        ]
    )
    assert wad_midi_lumps(wad) == [("D_E1M1", song), ("D_RUNNIN", other)]


def test_corrupt_wad_is_reported_with_its_name():
    wad = make_wad([("D_E1M1", midi_bytes())])
    truncated = wad[:-10]  # the directory runs past the end
    with pytest.raises(CorpusError, match="doom.wad: directory"):
        wad_midi_lumps(truncated, "doom.wad")
    with pytest.raises(CorpusError, match="not IWAD/PWAD"):
        wad_midi_lumps(b"JUNK" + wad[4:], "doom.wad")


# --- .deb ---------------------------------------------------------------------------------------


def test_ar_members_of_odd_size_are_padded():
    archive = make_ar([("a", b"odd"), ("b", b"even"), ("c", b"x")])
    assert read_ar(archive) == {"a": b"odd", "b": b"even", "c": b"x"}
    with pytest.raises(CorpusError, match="not an ar archive"):
        read_ar(b"PK\x03\x04zip", "x.deb")


def test_deb_yields_every_midi_file_wad_lump_version_and_licence():
    song, other, third, lump = midi_bytes(60), midi_bytes(62), midi_bytes(64), midi_bytes(66)
    deb = make_deb(
        "games-music",
        {
            "usr/share/games/g/music/Title.MID": song,
            "usr/share/doc/games-music/examples/a/tune.mid": other,
            "usr/share/doc/games-music/examples/b/tune.mid": third,
            "usr/share/doc/games-music/song.kar.gz": gzip.compress(song + b"k"),
            "usr/share/games/g/game.wad": make_wad([("D_INTRO", lump)]),
            "usr/share/games/g/readme.txt": b"not music",
            "usr/share/doc/games-music/copyright": DEP5_COPYRIGHT,
        },
    )
    package = unpack_deb(deb, "games-music")
    assert package.version == "1.2-3"
    assert package.licence == "GPL-2+"
    names = dict(package.midi_files)
    assert names == {
        "game-D_INTRO.mid": lump,
        "song.mid": song + b"k",  # .kar.gz: gunzipped, written as .mid
        "tune.mid": other,
        "b-tune.mid": third,  # same file name in another folder: the folder is added
        "Title.mid": song,
    }


def test_licence_of_free_form_and_custom_named_copyright_files():
    zlib_text = "License:\n  This software is provided 'as-is', without any express or implied\n"
    assert licence_from_copyright(zlib_text) == "Zlib"
    custom = (
        "Files: *\nLicense: game-license\n\nLicense: game-license\n Redistribution and use "
        "in source and binary forms, with or without\n modification, are permitted"
    )
    assert licence_from_copyright(custom) == "game-license (BSD)"
    assert licence_from_copyright("All rights reserved.").startswith("unknown")


def write_cached_deb(cache: Path, package: str, files: dict[str, bytes]) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    (cache / f"{package}_1.0-1_all.deb").write_bytes(make_deb(package, files, "1.0-1"))


def test_build_debian_deduplicates_by_content_and_reports_bad_files(tmp_path, monkeypatch):
    shared, own = midi_bytes(60, drums=True), midi_bytes(40)
    cache = tmp_path / "debs"
    write_cached_deb(
        cache, "first", {"usr/share/first/a.mid": shared, "usr/share/first/b.mid": own}
    )
    write_cached_deb(
        cache,
        "second",
        {"usr/share/second/copy.mid": shared, "usr/share/second/broken.mid": b"MThd garbage"},
    )
    monkeypatch.setattr(corpus.shutil, "which", lambda _: None)  # no apt-get: never download
    out = tmp_path / "band"
    report = build_debian(out, cache, ["first", "second", "missing-pkg"])

    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.mid")) == [
        "first/a.mid",
        "first/b.mid",
    ]
    assert report.duplicates == ["second/copy.mid = first/a.mid"]
    assert any(p.startswith("second/broken.mid: unreadable MIDI") for p in report.problems)
    missing = [p for p in report.problems if p.startswith("missing-pkg")]
    assert len(missing) == 1 and "apt-get not found" in missing[0]
    sources = (out / "SOURCES.md").read_text()
    assert "| first | 1.0-1 | unknown (see copyright file) | 2 |" in sources
    assert "| second | 1.0-1 | unknown (see copyright file) | 0 |" in sources

    again = build_debian(out, cache, ["first", "second"])  # a rerun copies nothing new
    assert (again.written, again.cached) == (0, 2)


def test_openttd_openmsx_is_refused_before_anything_is_downloaded(tmp_path):
    with pytest.raises(CorpusError, match="openttd-openmsx: reserved for evaluation"):
        build_debian(tmp_path / "band", tmp_path / "debs", ["freedoom", "openttd-openmsx"])
    assert not (tmp_path / "debs").exists() and not (tmp_path / "band").exists()


def test_command_line_refuses_openttd_openmsx(tmp_path, capsys):
    script = Path(__file__).parents[1] / "scripts" / "build_corpus.py"
    spec = importlib.util.spec_from_file_location("build_corpus", script)
    build_corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_corpus)
    status = build_corpus.main(
        ["--source", "debian", "--out", str(tmp_path), "--packages", "openttd-openmsx"]
    )
    assert status == 2
    assert "reserved for evaluation" in capsys.readouterr().err


# --- program plan -------------------------------------------------------------------------------


def test_program_plan_keeps_preferred_programs_and_gives_duplicates_alternatives():
    satb = [corpus.voice_request(r) for r in ("soprano", "alto", "tenor", "bass")]
    assert assign_programs(satb) == [52, 53, 54, 91]
    # S A T T B: the bass keeps its program although the second tenor comes first.
    five = [corpus.voice_request(r) for r in ("soprano", "alto", "tenor", "tenor", "bass")]
    assert assign_programs(five) == [52, 53, 54, 85, 91]
    quartet = [corpus.instrument_request(p) for p in (40, 40, 41, 42)]
    assert assign_programs(quartet) == [40, 110, 41, 42]
    trumpets_and_horns = [corpus.instrument_request(p) for p in (56, 56, 56, 60, 60)]
    assert assign_programs(trumpets_and_horns) == [56, 59, 61, 60, 62]  # 62: nearest free brass
    many = assign_programs([ProgramRequest(40)] * 20)
    assert len(set(many)) == 20


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Violin II", ProgramRequest(40, (110, 48, 49, 44))),
        ("2nd Violin", ProgramRequest(40, (110, 48, 49, 44))),
        ("Cantus I", "soprano"),
        ("Ct", "alto"),
        ("Basso continuo", ProgramRequest(19)),  # not a bass voice
        ("Corno 2", ProgramRequest(60)),  # music21 alone reads "Corno" as English horn
        ("Quinto", ""),  # a voice of unknown range
        ("MusicXML Part", None),
    ],
)
def test_part_names_map_to_instruments_and_voice_ranges(name, expected):
    assert corpus.request_from_name(name) == expected


def music21_score(parts: list[tuple[str | None, list[list[int]]]], pickup: float = 0.0):
    """A small music21 score in 3/4: each part is (name, quarter-note pitches bar by bar)."""
    from music21 import meter, note, stream

    score = stream.Score()
    for name, measures in parts:
        part = stream.Part()
        part.partName = name
        for number, bar in enumerate(measures):
            measure = stream.Measure(number=number)
            if number == 0:
                measure.append(meter.TimeSignature("3/4"))
                measure.paddingLeft = pickup
            for pitch in bar:
                measure.append(note.Note(pitch, quarterLength=1.0))
            part.append(measure)
        score.append(part)
    return score


def test_chorale_exports_one_track_per_voice_with_the_planned_programs(tmp_path):
    pytest.importorskip("music21")
    parts = [("Soprano", [72, 74, 76]), ("Alto", [67, 65, 64]), ("Tenor", [60, 62, 60]),
             ("Bass", [48, 50, 43])]  # fmt: skip
    score = corpus.music21_to_score(music21_score([(name, [bar]) for name, bar in parts]))
    path = tmp_path / "chorale.mid"
    score.dump_midi(path)
    loaded = Score(path)
    assert [(t.name, t.program, t.is_drum) for t in loaded.tracks] == [
        ("Soprano", 52, False), ("Alto", 53, False), ("Tenor", 54, False), ("Bass", 91, False)
    ]  # fmt: skip
    assert [[n.pitch for n in t.notes] for t in loaded.tracks] == [p for _, p in parts]
    assert [n.time for n in loaded.tracks[0].notes] == [0, 480, 960]
    assert (loaded.time_signatures[0].numerator, loaded.time_signatures[0].denominator) == (3, 4)
    assert loaded.tempos[0].qpm == pytest.approx(corpus.DEFAULT_QPM)


def test_quartet_parts_sharing_an_instrument_get_distinct_programs():
    pytest.importorskip("music21")
    from music21 import instrument

    names = ["Violin I", "Violin II", "Viola", "Violoncello"]
    score = music21_score([(name, [[60, 62, 64]]) for name in names])
    for part in score.parts:  # the encoder's default instrument, as in several corpus files
        part.insert(0, instrument.Piano())
    programs = [t.program for t in corpus.music21_to_score(score).tracks]
    assert programs == [40, 110, 41, 42]


def test_unnamed_voices_get_ranges_from_their_pitches():
    pytest.importorskip("music21")
    score = music21_score([(None, [[72, 74, 76]]), (None, [[48, 45, 43]]), (None, [[55, 57, 53]])])
    assert [t.program for t in corpus.music21_to_score(score).tracks] == [52, 91, 54]


def test_piano_staves_merge_into_one_track_but_a_voice_above_them_does_not():
    pytest.importorskip("music21")
    from music21 import instrument, note, stream

    score = stream.Score()
    voice = stream.Part([note.Note(72), note.Note(74)])
    voice.partName = "MusicXML Part"  # the generic name of one Dichterliebe song
    voice.insert(0, instrument.Choir())
    score.append(voice)
    for pitch in (67, 43):
        staff = stream.PartStaff([note.Note(pitch), note.Note(pitch + 2)])
        staff.partName = "MusicXML Part"
        score.append(staff)
    tracks = corpus.music21_to_score(score).tracks
    assert [(t.name, t.program) for t in tracks] == [
        ("Choir Aahs", 52),
        ("Acoustic Grand Piano", 0),
    ]
    assert sorted(n.pitch for n in tracks[1].notes) == [43, 45, 67, 69]


def test_upbeat_is_shifted_to_start_on_a_barline_and_ties_are_joined():
    pytest.importorskip("music21")
    from music21 import dynamics, note, tie

    score = music21_score([("Soprano", [[67], [72, 72, 72]]), ("Bass", [[48], [48, 48, 48]])], 2.0)
    soprano = score.parts[0]
    first_full_bar = soprano.getElementsByClass("Measure")[1]
    tied = list(first_full_bar.getElementsByClass(note.Note))
    tied[0].tie, tied[1].tie = tie.Tie("start"), tie.Tie("stop")
    first_full_bar.insert(0, dynamics.Dynamic("ff"))
    track = corpus.music21_to_score(score).tracks[0]
    # The one-beat upbeat sits on beats 3 of a 3/4 bar; the full bar starts at tick 3 * 480.
    assert [(n.time, n.duration, n.pitch) for n in track.notes] == [
        (960, 480, 67), (1440, 960, 72), (2400, 480, 72)
    ]  # fmt: skip
    assert track.notes[0].velocity == 70  # mf: no dynamic yet
    assert track.notes[1].velocity == round(dynamics.Dynamic("ff").volumeScalar * 127)


def test_a_corpus_chorale_is_exported_atomically_with_the_planned_programs(tmp_path):
    pytest.importorskip("music21")
    work = corpus.Music21Work("bach/bwv66.6.mxl")
    result = corpus.export_music21_work(work, tmp_path)
    path = tmp_path / "bach" / "bwv66.6.mid"
    assert work.output_path == Path("bach/bwv66.6.mid")
    assert path.exists() and not list(tmp_path.rglob("*.partial"))
    loaded = Score(path)
    assert result.tracks == len(loaded.tracks) == 4
    assert result.notes == loaded.note_num() > 100
    assert [t.program for t in loaded.tracks] == [52, 53, 54, 91]


def test_output_names_are_safe_and_tunes_are_numbered():
    work = corpus.Music21Work("trecento/PMFC_04-Quanto piu caro.xml")
    assert work.output_path == Path("trecento/PMFC_04-Quanto_piu_caro.mid")
    tune = corpus.Music21Work("airdsAirs/book6.abc", number=1003)
    assert tune.output_path == Path("airdsAirs/book6-1003.mid")
    nested = corpus.Music21Work("beethoven/opus18no1/movement3.mxl")
    assert nested.output_path == Path("beethoven/opus18no1-movement3.mid")


def test_works_are_multi_part_scores_one_encoding_each_and_josquin_tunes_merged():
    entries = [
        ("bach/bwv66.6.mxl", None, 4, None),
        ("bach/bwv66.6.rntxt", None, 1, None),  # a Roman-numeral analysis: one part
        ("beethoven/opus18no1/movement3.krn", None, 4, None),
        ("beethoven/opus18no1/movement3.mxl", None, 4, None),  # the same work as MusicXML
        ("airdsAirs/book6.abc", 1003, 2, "Mullindough"),
        ("airdsAirs/book6.abc", 1004, 1, "Irish Air."),
        ("demos/layoutTest.xml", None, 3, None),  # music21's own test fragment
        *[("josquin/milleRegrets.abc", n, 1, "Mille regrets") for n in (1, 2, 3, 4)],
        *[("essenFolksong/ballad80.abc", n, 1, "Graf und Nonne") for n in range(1, 94)],
    ]
    assert corpus.select_works(entries) == [
        corpus.Music21Work("airdsAirs/book6.abc", 1003),
        corpus.Music21Work("bach/bwv66.6.mxl"),
        corpus.Music21Work("beethoven/opus18no1/movement3.mxl"),
        corpus.Music21Work("josquin/milleRegrets.abc", merge_tunes=True),
    ]


def test_limit_samples_every_composer_first():
    works = [corpus.Music21Work(f"{c}/w{i}.mxl") for c in ("a", "b", "c") for i in range(3)]
    mixed = corpus.interleave_composers(works)
    assert [w.composer for w in mixed[:3]] == ["a", "b", "c"]
    assert sorted(mixed, key=lambda w: w.corpus_path) == works


# --- isolated workers ---------------------------------------------------------------------------


def _job(kind: str) -> str:
    if kind == "sleep":
        time.sleep(30)
    if kind == "raise":
        raise ValueError("bad score")
    if kind == "die":
        os._exit(3)
    return kind.upper()


def test_slow_failing_and_dying_workers_are_reported_not_fatal():
    start = time.monotonic()
    outcomes = {job: (result, error) for job, result, error in
                run_isolated(["ok", "sleep", "raise", "die"], _job, workers=2, timeout=2.0)}  # fmt: skip
    assert time.monotonic() - start < 15
    assert outcomes["ok"] == ("OK", None)
    assert outcomes["sleep"] == (None, "timed out after 2 s")
    assert outcomes["raise"] == (None, "ValueError: bad score")
    assert outcomes["die"] == (None, "worker died without a result")


# --- statistics and fixtures --------------------------------------------------------------------


def test_stats_count_pieces_per_source_and_pieces_per_family(tmp_path):
    (tmp_path / "band" / "p").mkdir(parents=True)
    (tmp_path / "music21").mkdir()
    (tmp_path / "band" / "p" / "drums.mid").write_bytes(midi_bytes(36, drums=True, notes=8))
    (tmp_path / "band" / "p" / "bass.mid").write_bytes(midi_bytes(40, notes=2))
    (tmp_path / "music21" / "bass.mid").write_bytes(midi_bytes(40, notes=3))
    stats = corpus_stats(tmp_path)
    assert list(stats) == ["band", "music21"]
    band = stats["band"]
    assert (band.pieces, band.tracks, band.notes) == (2, 2, 10)
    assert band.pieces_with_family == {"Drums": 1, "Bass": 1}
    # Notes every 0.5 s (120 qpm), 0.25 s long: the pieces end at 3.75 s and 0.75 s.
    assert band.seconds == pytest.approx(3.75 + 0.75)
    table = corpus.format_stats(stats)
    assert "| total | 3 | 3 | 13 |" in table


def test_fixtures_are_a_small_two_source_corpus():
    files = sorted(FIXTURES.rglob("*.mid"))
    assert sum(p.stat().st_size for p in files) < 300_000
    by_source = {source: [p for p in files if p.relative_to(FIXTURES).parts[0] == source]
                 for source in ("music21", "band")}  # fmt: skip
    assert len(by_source["music21"]) >= 5 and len(by_source["band"]) >= 4
    readme = (FIXTURES.parent / "README.md").read_text()
    for path in files:
        assert path.name in readme, f"{path.name} is not described in tests/fixtures/README.md"
        assert Score(path).note_num() > 0
    for path in by_source["music21"]:
        programs = [t.program for t in Score(path).tracks]
        assert len(programs) == len(set(programs)), f"{path.name}: tracks share a program"
    with_drums = [p for p in by_source["band"] if any(t.is_drum for t in Score(p).tracks)]
    assert len(with_drums) >= 4
    meters = {(ts.numerator, ts.denominator) for p in by_source["music21"]
              for ts in Score(p).time_signatures}  # fmt: skip
    assert {(4, 4), (3, 4)} <= meters and len(meters) >= 3
