"""Build the development corpus: music21's bundled scores and Debian game/band MIDI -> one tree.

Layout (the first folder below the MIDI root names the *source* used for dataset mixing)::

    corpus/music21/<composer>/<work>.mid    one track per part, distinct GM programs (plan below)
    corpus/band/<package>/<name>.mid        MIDI files shipped in Debian game/music packages

``scripts/build_corpus.py`` is the command line; docs/data.md has the measured numbers.
music21 is an optional dependency (``pip install polyphony[corpus]``) and imported lazily.
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import io
import itertools
import multiprocessing
import multiprocessing.connection
import re
import shutil
import struct
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from symusic import Note, Score, Tempo, TimeSignature, Track

from polyphony.data.midi_input import MIDI_SUFFIXES
from polyphony.instruments import DRUMS, FAMILIES, GM_NAMES, program_to_instrument

TICKS_PER_QUARTER = 480
DEFAULT_QPM = 100.0  # music21 scores without a metronome mark


class CorpusError(RuntimeError):
    """A corpus source that cannot be built; the message names the input and the fix."""


def safe_file_name(name: str) -> str:
    """A name that is safe on every file system (music21 titles have spaces and quotes)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "untitled"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# The program plan: every part of a music21 work gets its own GM program.
#
# miditok REMI/CPWord identify a track by its program, so two parts sharing a program (SATB all
# "voice", two violins) would be merged into one track. Each part first asks for the program of
# its instrument or voice range; parts that find it taken get the next free alternative.

VOICE_PROGRAMS = {"soprano": 52, "alto": 53, "tenor": 54, "bass": 91}  # Choir Aahs, Voice Oohs,
# Synth Voice, Pad 4 (choir): the four choir-like GM sounds, high to low.
EXTRA_VOICE_PROGRAMS = {
    # A second voice of the same range (S A T T B, double choirs): first the last voice-like
    # sound, Lead 6 (voice), then the instruments that doubled voices colla parte around 1600.
    "soprano": (85, 74, 68),  # Lead 6 (voice), Recorder, Oboe (shawm / cornett)
    "alto": (85, 71, 68),  # Lead 6 (voice), Clarinet, Oboe
    "tenor": (85, 57, 71),  # Lead 6 (voice), Trombone (sackbut), Clarinet
    "bass": (85, 70, 57),  # Lead 6 (voice), Bassoon (dulcian), Trombone
}
INSTRUMENT_ALTERNATIVES = {
    # Without an entry, a second part takes the nearest free program of its GM family.
    40: (110, 48, 49, 44),  # Violin II: Fiddle (a solo violin sound), then string ensembles
    41: (49, 48, 44),  # a second viola
    42: (49, 48, 43),  # a second cello
    56: (59, 61),  # Trumpet II, III: Muted Trumpet, Brass Section (not Trombone, Tuba)
    68: (69, 71),  # Oboe II, III: English Horn, Clarinet (not Baritone Sax)
}
# Part-name words music21's instrument.fromString misses or gets wrong (it reads "Corno" as
# English horn and "Basso continuo" as a bass voice). Instrument words win over voice words.
INSTRUMENT_WORDS = {
    "continuo": 19, "bc": 19, "organo": 19, "violone": 43, "corno": 60, "corni": 60,
    "cornet": 56, "cornetto": 56, "zink": 56, "klarinette": 71,
}  # fmt: skip
VOICE_WORDS = {
    "soprano": "soprano", "sopran": "soprano", "cantus": "soprano", "canto": "soprano",
    "superius": "soprano", "discantus": "soprano", "treble": "soprano", "triplum": "soprano",
    "tripl": "soprano", "alto": "alto", "altus": "alto", "contralto": "alto",
    "contratenor": "alto", "countertenor": "alto", "duplum": "alto", "dupl": "alto",
    "motetus": "alto", "tenor": "tenor", "tenore": "tenor", "bass": "bass", "bassus": "bass",
    "basso": "bass", "baritone": "bass", "bariton": "bass",
    # A voice whose range the name does not tell: decided from its notes.
    "quintus": "", "quinto": "", "sextus": "", "sesto": "", "septimus": "", "vagans": "",
    "voice": "", "vox": "", "gesang": "", "choir": "", "chorus": "",
}  # fmt: skip
VOICE_ABBREVIATIONS = {"s": "soprano", "c": "soprano", "a": "alto", "ct": "alto", "t": "tenor",
                       "b": "bass"}  # fmt: skip
# Words that say nothing about the instrument ("MusicXML Part", "Instrument 7").
EMPTY_NAME_WORDS = {"musicxml", "part", "instrument", "staff", "default", "player", "solo"}
ROMAN_NUMERALS = {"i", "ii", "iii", "iv", "vi", "vii", "viii"}  # "v" is kept: too ambiguous


@dataclass(frozen=True)
class ProgramRequest:
    """What one part asks for: a preferred GM program and, in order, what it accepts instead."""

    preferred: int
    alternatives: tuple[int, ...] = ()


def voice_range_from_pitches(pitches: Sequence[int]) -> str:
    """Soprano/alto/tenor/bass from the median MIDI pitch of an unnamed vocal part."""
    if not pitches:
        return "alto"
    median = sorted(pitches)[len(pitches) // 2]
    if median >= 65:
        return "soprano"
    if median >= 59:
        return "alto"
    if median >= 52:
        return "tenor"
    return "bass"


def voice_request(voice_range: str) -> ProgramRequest:
    return ProgramRequest(VOICE_PROGRAMS[voice_range], EXTRA_VOICE_PROGRAMS[voice_range])


def instrument_request(program: int) -> ProgramRequest:
    return ProgramRequest(program, INSTRUMENT_ALTERNATIVES.get(program, ()))


def name_words(part_name: str | None) -> list[str]:
    """Meaningful lower-case words of a part name: no numbers, ordinals or roman numerals."""
    words = re.findall(r"[^\W\d_]+", (part_name or "").lower())
    ordinal_suffixes = {"st", "nd", "rd", "th"}
    return [
        w
        for w in words
        if w not in ROMAN_NUMERALS and w not in EMPTY_NAME_WORDS and w not in ordinal_suffixes
    ]


def request_from_name(part_name: str | None) -> ProgramRequest | str | None:
    """A part name -> a ProgramRequest, a voice range ('' = a voice of unknown range), or None.

    Checked in order: our instrument words, our voice words and abbreviations, then music21's
    multilingual instrument.fromString.
    """
    words = name_words(part_name)
    if not words:
        return None
    for word in words:
        if word in INSTRUMENT_WORDS:
            return instrument_request(INSTRUMENT_WORDS[word])
    for word in words:
        if word in VOICE_WORDS:
            return VOICE_WORDS[word]
    if len(words) == 1 and words[0] in VOICE_ABBREVIATIONS:
        return VOICE_ABBREVIATIONS[words[0]]
    from music21 import instrument
    from music21.exceptions21 import InstrumentException

    try:
        found = instrument.fromString(" ".join(words))
    except InstrumentException:
        return None
    return request_from_instrument(found)


def request_from_instrument(found) -> ProgramRequest | str | None:
    """A music21 Instrument object -> ProgramRequest, a voice range, or None if generic."""
    from music21 import instrument

    vocal_ranges = {
        instrument.Soprano: "soprano", instrument.MezzoSoprano: "soprano",
        instrument.Alto: "alto", instrument.Tenor: "tenor",
        instrument.Baritone: "bass", instrument.Bass: "bass",
    }  # fmt: skip
    if isinstance(found, instrument.Vocalist):
        return vocal_ranges.get(type(found), "")
    if type(found) is instrument.Instrument or found.midiProgram is None:
        return None  # the generic class music21 uses when a file names no instrument
    return instrument_request(found.midiProgram)


def assign_programs(requests: Sequence[ProgramRequest]) -> list[int]:
    """Distinct GM programs, one per request, in the order given.

    First every part gets its preferred program if no earlier part took it, so a bass keeps its
    program even when a second tenor comes before it in the score; the parts left over take
    their first free alternative, then the nearest free program of the same GM family, then any.
    """
    programs: list[int | None] = [None] * len(requests)
    taken: set[int] = set()
    for index, request in enumerate(requests):
        if request.preferred not in taken:
            programs[index] = request.preferred
            taken.add(request.preferred)
    for index, request in enumerate(requests):
        if programs[index] is not None:
            continue
        family_start = request.preferred // 8 * 8
        same_family = sorted(
            range(family_start, family_start + 8),
            key=lambda p: (abs(p - request.preferred), p < request.preferred),
        )
        for candidate in itertools.chain(request.alternatives, same_family, range(128)):
            if candidate not in taken:
                programs[index] = candidate
                taken.add(candidate)
                break
        else:
            raise CorpusError(f"{len(requests)} parts: more than 128 parts cannot get programs")
    return programs  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# music21 -> symusic


@dataclass(frozen=True)
class Music21Work:
    """One work of the music21 corpus: a file, or one tune (`number`) of a multi-tune file."""

    corpus_path: str  # relative to the music21 corpus, e.g. "bach/bwv66.6.mxl"
    number: int | None = None
    merge_tunes: bool = False  # an ABC file whose tunes are the parts of one work (Josquin)

    @property
    def composer(self) -> str:
        return self.corpus_path.split("/")[0]

    @property
    def output_path(self) -> Path:
        """<composer>/<work>.mid, e.g. beethoven/opus18no1-movement3.mid."""
        inner = Path(self.corpus_path).with_suffix("").parts[1:]
        work = "-".join(inner) + (f"-{self.number}" if self.number is not None else "")
        return Path(self.composer) / f"{safe_file_name(work)}.mid"


# Folders of the corpus that are not repertoire: music21's own test fragments and exercises.
EXCLUDED_COMPOSERS = ("demos", "theoryExercises")
# When a work comes in several encodings (beethoven/opus18no1 has .mxl and .krn), keep one.
FORMAT_PREFERENCE = (".mxl", ".musicxml", ".xml", ".krn", ".abc")
MAX_VOICES_AS_TUNES = 8


def list_music21_works() -> list[Music21Work]:
    """Every multi-part work of music21's bundled corpus, from its metadata (nothing parsed)."""
    from music21 import corpus

    entries = [
        (str(e.sourcePath), e.number, e.metadata.numberOfParts or 0, e.metadata.title)
        for e in corpus.corpora.CoreCorpus().metadataBundle
        if e.metadata is not None
    ]
    return select_works(entries)


def select_works(
    entries: Iterable[tuple[str, int | None, int, str | None]],
) -> list[Music21Work]:
    """The works to export from (corpus path, tune number, number of parts, title) entries.

    Single-part works (folk-tune books, Roman-numeral analyses) are left out. An ABC file of 2
    to 8 single-part tunes sharing one title is one work written part by part (Josquin): it is
    merged into one score. (Essen's ballad80 has 93 variants of one ballad under one title.)
    """
    works: list[Music21Work] = []
    tunes_by_file: dict[str, list] = collections.defaultdict(list)
    for path, number, parts, title in entries:
        if path.split("/")[0] in EXCLUDED_COMPOSERS:
            continue
        if parts >= 2:
            works.append(Music21Work(path, number))
        elif number is not None:
            tunes_by_file[path].append(title)
    for path, titles in tunes_by_file.items():
        if 2 <= len(titles) <= MAX_VOICES_AS_TUNES and len(set(titles)) == 1:
            works.append(Music21Work(path, merge_tunes=True))
    chosen: dict[tuple[str, int | None], Music21Work] = {}
    for work in works:
        key = (str(Path(work.corpus_path).with_suffix("")), work.number)
        previous = chosen.get(key)
        if previous is None or _format_rank(work) < _format_rank(previous):
            chosen[key] = work
    return sorted(chosen.values(), key=lambda w: (w.corpus_path, w.number or 0))


def _format_rank(work: Music21Work) -> int:
    suffix = Path(work.corpus_path).suffix.lower()
    return (
        FORMAT_PREFERENCE.index(suffix) if suffix in FORMAT_PREFERENCE else len(FORMAT_PREFERENCE)
    )


def interleave_composers(works: Sequence[Music21Work]) -> list[Music21Work]:
    """Round-robin over composers, so that `--limit 20` samples the whole corpus."""
    by_composer: dict[str, list[Music21Work]] = collections.defaultdict(list)
    for work in works:
        by_composer[work.composer].append(work)
    rounds = itertools.zip_longest(*by_composer.values())
    return [work for round_ in rounds for work in round_ if work is not None]


def parse_music21_work(work: Music21Work):
    from music21 import corpus

    # forceSource: music21 would otherwise write a pickle of every parsed score to its scratch
    # folder; our exported MIDI files are the cache.
    parsed = corpus.parse(work.corpus_path, number=work.number, forceSource=True)
    if work.merge_tunes:
        parsed = parsed.mergeScores()
    return parsed


def _instrument_groups(parts) -> list[list]:
    """Parts that are the staves of one instrument (a piano's PartStaffs) form one group."""
    from music21 import stream

    groups: list[list] = []
    for part in parts:
        previous = groups[-1][-1] if groups else None
        same_instrument = (
            previous is not None
            and part.partName == previous.partName
            and (
                (isinstance(part, stream.PartStaff) and isinstance(previous, stream.PartStaff))
                or request_from_name(part.partName) == instrument_request(0)
            )
        )
        if same_instrument:
            groups[-1].append(part)
        else:
            groups.append([part])
    return groups


def _group_request(group, pitches: Sequence[int]) -> ProgramRequest:
    """Name first (encoders often leave a default instrument), then instrument, then staves."""
    request = request_from_name(group[0].partName)
    if request is None:
        request = request_from_instrument(group[0].getInstrument())
    if request is None:
        # No information at all: several staves are a keyboard, one staff is a voice (most of
        # the corpus without instrument names is vocal polyphony).
        request = instrument_request(0) if len(group) > 1 else ""
    if isinstance(request, str):
        return voice_request(request or voice_range_from_pitches(pitches))
    return request


def _part_notes(part, pickup_ticks: int) -> list[Note]:
    """Sounding notes of one part: tied notes joined, grace notes dropped, velocity from dynamics.

    Ties are joined here rather than with music21's stripTies, which is quadratic (a long
    Beethoven quartet took 165 s in it).
    """
    from music21 import chord, dynamics, note

    velocity = round(dynamics.Dynamic("mf").volumeScalar * 127)
    notes: list[list[int]] = []  # [start, duration, pitch, velocity]
    open_ties: dict[int, int] = {}  # pitch -> index in notes of the note a tie continues
    flat = part.flatten()
    for element in flat.getElementsByClass([note.Note, chord.Chord, dynamics.Dynamic]):
        if isinstance(element, dynamics.Dynamic):
            if element.volumeScalar is not None:
                velocity = max(1, min(127, round(element.volumeScalar * 127)))
            continue
        duration = round(float(element.quarterLength) * TICKS_PER_QUARTER)
        if duration <= 0:
            continue  # grace notes have no notated duration
        start = round(float(element.offset) * TICKS_PER_QUARTER) + pickup_ticks
        explicit = element.volume.velocity if element.hasVolumeInformation() else None
        members = element.notes if isinstance(element, chord.Chord) else (element,)
        for member in members:
            pitch = member.pitch.midi
            if not 0 <= pitch <= 127:
                continue
            tie = member.tie
            tie_type = tie.type if tie is not None else None
            if tie_type in ("stop", "continue") and pitch in open_ties:
                tied = notes[open_ties[pitch]]
                tied[1] = start + duration - tied[0]
                if tie_type == "stop":
                    del open_ties[pitch]
                continue
            notes.append([start, duration, pitch, explicit or velocity])
            if tie_type in ("start", "continue"):
                open_ties[pitch] = len(notes) - 1
    return [Note(*values) for values in notes]


def _pickup_ticks(part) -> int:
    """Ticks to shift a work with an upbeat so that its first full bar starts on a barline."""
    from music21 import stream

    first_measure = part.getElementsByClass(stream.Measure).first()
    if first_measure is None:
        return 0
    return round(float(first_measure.paddingLeft) * TICKS_PER_QUARTER)


def music21_to_score(parsed) -> Score:
    """A parsed music21 Score -> symusic Score at 480 tpq, one track per instrument group."""
    from music21 import meter, tempo

    groups = _instrument_groups(parsed.parts)
    pickup = _pickup_ticks(groups[0][0])
    group_notes = [[n for part in group for n in _part_notes(part, pickup)] for group in groups]
    requests = [
        _group_request(group, [n.pitch for n in notes])
        for group, notes in zip(groups, group_notes, strict=True)
    ]
    programs = assign_programs(requests)

    score = Score(TICKS_PER_QUARTER)
    qpm = next(
        (
            mark.getQuarterBPM()
            for mark in parsed.recurse().getElementsByClass(tempo.MetronomeMark)
            if mark.getQuarterBPM()
        ),
        DEFAULT_QPM,
    )
    score.tempos.append(Tempo(0, float(qpm)))
    last_signature = None
    first_part = groups[0][0]
    for signature in first_part.recurse().getElementsByClass(meter.TimeSignature):
        key = (signature.numerator, signature.denominator)
        if key != last_signature:
            offset = float(signature.getOffsetInHierarchy(first_part))
            time = 0 if offset == 0 else round(offset * TICKS_PER_QUARTER) + pickup
            score.time_signatures.append(TimeSignature(time, *key))
            last_signature = key
    for group, notes, program in zip(groups, group_notes, programs, strict=True):
        # "MusicXML Part" and the like name nothing: such tracks are named after their program.
        name = group[0].partName if name_words(group[0].partName) else GM_NAMES[program]
        track = Track(name=name, program=program, is_drum=False)
        track.notes.extend(sorted(notes, key=lambda n: (n.time, n.pitch)))
        score.tracks.append(track)
    return score


@dataclass(frozen=True)
class ExportResult:
    tracks: int
    notes: int
    skipped: str = ""  # why the work was not written ("" = written)


def export_music21_work(work: Music21Work, out_dir: Path) -> ExportResult:
    """Parse one work and write out_dir/<composer>/<work>.mid (atomically: killed -> no file)."""
    score = music21_to_score(parse_music21_work(work))
    score.tracks = [t for t in score.tracks if t.notes]
    if not score.tracks:
        return ExportResult(0, 0, "no notes")
    target = out_dir / work.output_path
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".mid.partial")
    score.dump_midi(partial)
    partial.replace(target)
    return ExportResult(len(score.tracks), score.note_num())


# ---------------------------------------------------------------------------------------------
# Isolated workers: music21 parsing is slow and can hang; one forked process per work.


def _run_in_child(work: Callable, job, connection) -> None:
    try:
        connection.send((True, work(job)))
    except Exception as error:  # reported to the parent, which carries on
        connection.send((False, f"{type(error).__name__}: {error}"))
    finally:
        connection.close()


def run_isolated(
    jobs: Iterable, work: Callable, workers: int, timeout: float
) -> Iterator[tuple[object, object | None, str | None]]:
    """Yield (job, result, error) as each `work(job)` finishes in its own forked process.

    Fork, not spawn: children inherit the imported music21 (a re-import costs ~1 s per work). A
    child past `timeout` seconds is killed; a crash or a kill is reported, never fatal.
    """
    context = multiprocessing.get_context("fork")
    pending = list(jobs)[::-1]
    running: dict = {}  # parent end of the pipe -> (job, process, deadline)
    while pending or running:
        while pending and len(running) < workers:
            job = pending.pop()
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(target=_run_in_child, args=(work, job, sender), daemon=True)
            process.start()
            sender.close()  # the child holds the only writer: its exit means EOF here
            running[receiver] = (job, process, time.monotonic() + timeout)
        for receiver in multiprocessing.connection.wait(list(running), timeout=1.0):
            job, process, _ = running.pop(receiver)
            try:
                ok, payload = receiver.recv()
            except EOFError:
                ok, payload = False, "worker died without a result"
            receiver.close()
            process.join()
            yield (job, payload, None) if ok else (job, None, payload)
        now = time.monotonic()
        for receiver, (job, process, deadline) in list(running.items()):
            if now > deadline:
                process.kill()
                process.join()
                receiver.close()
                del running[receiver]
                yield job, None, f"timed out after {timeout:.0f} s"


@dataclass
class BuildReport:
    """What one source build did: counts and every problem, for the summary and SOURCES.md."""

    written: int = 0
    cached: int = 0
    problems: list[str] = field(default_factory=list)  # "<input>: <why>", one per skipped item
    duplicates: list[str] = field(default_factory=list)  # "<skipped> = <kept>"


def _export_job(job: tuple[Music21Work, Path]) -> ExportResult:
    work, out_dir = job
    return export_music21_work(work, out_dir)


def build_music21(
    out_dir: Path, limit: int | None = None, workers: int = 2, timeout: float = 300.0
) -> BuildReport:
    """Export music21's multi-part works to out_dir; works already exported are skipped."""
    from tqdm import tqdm

    try:
        import music21  # noqa: F401
    except ImportError as error:
        raise CorpusError(
            "music21 is not installed: pip install 'polyphony[corpus]' (or pip install music21)"
        ) from error
    works = interleave_composers(list_music21_works())
    if limit is not None:
        works = works[:limit]
    report = BuildReport()
    todo = [w for w in works if not (out_dir / w.output_path).exists()]
    report.cached = len(works) - len(todo)
    jobs = [(work, out_dir) for work in todo]
    with tqdm(total=len(jobs), desc="music21", unit="work") as progress:
        for (work, _), result, error in run_isolated(jobs, _export_job, workers, timeout):
            progress.update()
            name = f"{work.corpus_path}" + (f" #{work.number}" if work.number is not None else "")
            if error is not None:
                report.problems.append(f"{name}: {error}")
                # A killed worker may leave its half-written file behind.
                (out_dir / work.output_path).with_suffix(".mid.partial").unlink(missing_ok=True)
            elif result.skipped:
                report.problems.append(f"{name}: {result.skipped}")
            else:
                report.written += 1
    report.duplicates = remove_duplicate_files(out_dir)
    write_music21_sources(out_dir, report)
    return report


def remove_duplicate_files(root: Path) -> list[str]:
    """Delete MIDI files whose bytes equal an earlier one (sorted by path); list what went."""
    kept: dict[str, Path] = {}
    removed = []
    for path in sorted(root.rglob("*.mid")):
        digest = sha256(path.read_bytes())
        if digest in kept:
            path.unlink()
            removed.append(f"{path.relative_to(root)} = {kept[digest].relative_to(root)}")
        else:
            kept[digest] = path
    return removed


MUSIC21_LICENCE = (
    'music21 (BSD-3-Clause) ships this corpus "with the permission of the encoders (and, '
    'where needed, the composers or arrangers)"; every piece is out of copyright in the US or '
    "licensed for use, but some encodings may not be used commercially (music21/corpus/"
    "license.txt). The Josquin ABC files are GPL-2+ (Laura E. Conrad); per-work notices "
    "found in the metadata are listed below."
)


def write_music21_sources(out_dir: Path, report: BuildReport) -> None:
    """OUT/SOURCES.md: works and tracks per composer, programs as applied, licences, problems."""
    from music21 import corpus

    notice_counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for entry in corpus.corpora.CoreCorpus().metadataBundle:
        if entry.metadata is not None and entry.metadata.copyright:
            text = " ".join(str(entry.metadata.copyright).split())
            notice_counts[str(entry.sourcePath).split("/")[0]][text[:120]] += 1
    # The two most frequent per composer: Monteverdi's notices are OCR noise in many variants.
    notices = {c: [t for t, _ in n.most_common(2)] for c, n in notice_counts.items()}
    works_by_composer = collections.Counter()
    tracks_by_composer = collections.Counter()
    names_by_program: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for path in sorted(out_dir.rglob("*.mid")):
        composer = path.relative_to(out_dir).parts[0]
        score = Score(path)
        works_by_composer[composer] += 1
        tracks_by_composer[composer] += len(score.tracks)
        for track in score.tracks:
            names_by_program[track.program][track.name] += 1
    lines = [
        "# music21 corpus export",
        "",
        "Built by `scripts/build_corpus.py --source music21` from the corpus bundled with the "
        "music21 package; one MIDI track per part, programs from the plan in docs/data.md.",
        "",
        f"Licence: {MUSIC21_LICENCE}",
        "",
        "| composer | works | tracks | notices in the files |",
        "| --- | ---: | ---: | --- |",
    ]
    for composer in sorted(works_by_composer):
        notice = "; ".join(notices.get(composer, [])) or "-"
        lines.append(
            f"| {composer} | {works_by_composer[composer]} | {tracks_by_composer[composer]} "
            f"| {notice} |"
        )
    lines += ["", "## Programs as applied", "", "| program | parts | most common part names |",
              "| --- | ---: | --- |"]  # fmt: skip
    for program in sorted(names_by_program):
        names = names_by_program[program]
        common = ", ".join(f"{name} ({count})" for name, count in names.most_common(5))
        lines.append(f"| {program} {GM_NAMES[program]} | {sum(names.values())} | {common} |")
    _append_problems(lines, report)
    (out_dir / "SOURCES.md").write_text("\n".join(lines) + "\n")


def _append_problems(lines: list[str], report: BuildReport) -> None:
    if report.problems:
        lines += ["", "## Skipped", ""] + [f"- {p}" for p in report.problems]
    if report.duplicates:
        lines += ["", "## Duplicates removed (identical bytes)", ""]
        lines += [f"- {d}" for d in report.duplicates]


# ---------------------------------------------------------------------------------------------
# Debian packages: .deb (ar) -> data.tar -> MIDI files and WAD lumps

DEBIAN_PACKAGES = (
    "freedoom", "simutrans-data", "planetblupi-music-midi", "mma", "freedink-data",
    "pianobooster", "kobodeluxe-data", "liquidwar-data", "pangzero",
)  # fmt: skip
# Never part of a training corpus: its MIDI files are held out to evaluate models on music
# they have never seen.
RESERVED_PACKAGES = {"openttd-openmsx": "reserved for evaluation (held-out test music)"}

AR_MAGIC = b"!<arch>\n"
AR_HEADER_SIZE = 60
WAD_HEADER = struct.Struct("<4sii")  # 'IWAD' or 'PWAD', lump count, directory offset
WAD_ENTRY = struct.Struct("<ii8s")  # lump offset, lump size, name (NUL-padded)


def read_ar(data: bytes, source: str = "archive") -> dict[str, bytes]:
    """Members of a Unix `ar` archive (a .deb is one): name -> bytes."""
    if not data.startswith(AR_MAGIC):
        raise CorpusError(f"{source}: not an ar archive (no '!<arch>' header); not a .deb?")
    members = {}
    position = len(AR_MAGIC)
    while position + AR_HEADER_SIZE <= len(data):
        header = data[position : position + AR_HEADER_SIZE]
        if header[58:60] != b"`\n":
            raise CorpusError(f"{source}: corrupt ar member header at byte {position}")
        name = header[:16].decode("ascii").strip().rstrip("/")  # GNU ar ends names with '/'
        size = int(header[48:58].decode("ascii"))
        start = position + AR_HEADER_SIZE
        members[name] = data[start : start + size]
        position = start + size + size % 2  # members start on even offsets
    return members


def _open_tar(name: str, data: bytes, source: str) -> tarfile.TarFile:
    compression = {".tar": "", ".gz": "gz", ".xz": "xz", ".bz2": "bz2"}.get(Path(name).suffix)
    if compression is None:
        # Debian bookworm packages all use xz; zstd would need the `zstandard` package.
        raise CorpusError(f"{source}: {name} uses an unsupported compression; extract it by hand")
    return tarfile.open(fileobj=io.BytesIO(data), mode=f"r:{compression}")


def deb_tar(deb: bytes, prefix: str, source: str) -> tarfile.TarFile:
    """The data.tar.* (prefix 'data.tar') or control.tar.* member of a .deb, opened."""
    members = read_ar(deb, source)
    for name, data in members.items():
        if name.startswith(prefix):
            return _open_tar(name, data, source)
    raise CorpusError(f"{source}: no {prefix}.* member (found {', '.join(members)})")


def wad_midi_lumps(wad: bytes, source: str = "WAD") -> list[tuple[str, bytes]]:
    """(lump name, bytes) of every music lump `D_*` of a Doom WAD that is a standard MIDI file."""
    if len(wad) < WAD_HEADER.size:
        raise CorpusError(f"{source}: {len(wad)} bytes is too short for a WAD header")
    kind, count, directory = WAD_HEADER.unpack_from(wad)
    if kind not in (b"IWAD", b"PWAD"):
        raise CorpusError(f"{source}: header {kind!r} is not IWAD/PWAD")
    if directory < 0 or count < 0 or directory + count * WAD_ENTRY.size > len(wad):
        raise CorpusError(f"{source}: directory ({count} lumps at {directory}) is past the end")
    lumps = []
    for index in range(count):
        offset, size, raw_name = WAD_ENTRY.unpack_from(wad, directory + index * WAD_ENTRY.size)
        name = raw_name.split(b"\0", 1)[0].decode("ascii", "replace")
        data = wad[offset : offset + size]
        if name.startswith("D_") and data.startswith(b"MThd"):  # not the MUS format
            lumps.append((name, data))
    return lumps


@dataclass
class DebianPackage:
    """What one .deb yields: its version, licence, copyright text and MIDI files by name."""

    name: str
    version: str = "?"
    licence: str = "unknown (see copyright file)"
    copyright_text: str = ""
    midi_files: list[tuple[str, bytes]] = field(default_factory=list)  # (output name, bytes)


def _midi_member(member_name: str) -> str | None:
    """The MIDI file name of a tar member (gzip-compressed docs too: x.mid.gz), or None."""
    name = Path(member_name).name
    if name.lower().endswith(".gz"):
        name = name[:-3]
    return name if Path(name).suffix.lower() in MIDI_SUFFIXES else None


def unpack_deb(deb: bytes, package: str) -> DebianPackage:
    """Read a .deb in memory: version, licence, and every MIDI file and WAD music lump."""
    result = DebianPackage(package)
    source = f"{package}.deb"
    control = deb_tar(deb, "control.tar", source)
    for member in control:
        if Path(member.name).name == "control" and member.isfile():
            text = control.extractfile(member).read().decode("utf-8", "replace")
            found = re.search(r"^Version:\s*(\S+)", text, re.M)
            result.version = found.group(1) if found else "?"
    found_files: list[tuple[str, str, bytes]] = []  # (member path, output stem, bytes)
    data = deb_tar(deb, "data.tar", source)
    for member in data:
        if not member.isfile():
            continue
        path = member.name.lstrip("./")
        if path == f"usr/share/doc/{package}/copyright":
            result.copyright_text = data.extractfile(member).read().decode("utf-8", "replace")
            result.licence = licence_from_copyright(result.copyright_text)
        elif (midi_name := _midi_member(path)) is not None:
            content = data.extractfile(member).read()
            if path.lower().endswith(".gz"):
                content = gzip.decompress(content)
            found_files.append((path, Path(midi_name).stem, content))
        elif path.lower().endswith(".wad"):
            wad = data.extractfile(member).read()
            for lump, content in wad_midi_lumps(wad, f"{source}:{path}"):
                found_files.append((f"{path}:{lump}", f"{Path(path).stem}-{lump}", content))
    used: set[str] = set()
    for path, stem, content in sorted(found_files):
        name = safe_file_name(stem)
        if name in used:  # same file name in two folders (mma examples): add the folder
            name = safe_file_name(f"{Path(path.split(':')[0]).parent.name}-{stem}")
        base, counter = name, 2
        while name in used:
            name, counter = f"{base}-{counter}", counter + 1
        used.add(name)
        result.midi_files.append((f"{name}.mid", content))
    return result


KNOWN_LICENCE_TEXTS = (
    # Phrases of free-form (non machine-readable) copyright files -> SPDX-style names.
    ("provided 'as-is', without any express or implied", "Zlib"),
    ("gnu general public license, version 2 or later", "GPL-2+"),
    ("version 2 of the license, or (at your option) any later", "GPL-2+"),
    ("version 3 of the license, or (at your option) any later", "GPL-3+"),
    ("redistribution and use in source and binary forms", "BSD"),
)


def licence_from_copyright(text: str) -> str:
    """The licence of a package's usr/share/doc/<pkg>/copyright file.

    Machine-readable (DEP-5) files: the License field of the `Files: *` paragraph, with the
    kind of licence added when the package gave it its own name ("freedoom-license (BSD)").
    Free-form files: the first known licence statement found in the text.
    """
    for paragraph in re.split(r"\n[ \t]*\n", text):
        if re.search(r"^Files:\s*\*\s*$", paragraph, re.M):
            found = re.search(r"^License:[ \t]*(\S.*)$", paragraph, re.M)
            if found:
                name = found.group(1).strip()
                if name.lower().endswith("-license"):
                    kind = _known_licence(_licence_paragraph(text, name))
                    return f"{name} ({kind})" if kind else name
                return name
    return _known_licence(text) or "unknown (see copyright file)"


def _licence_paragraph(text: str, name: str) -> str:
    """The stand-alone `License: <name>` paragraph of a DEP-5 file (the licence text)."""
    for paragraph in re.split(r"\n[ \t]*\n(?=\S)", text):
        if paragraph.startswith(f"License: {name}"):
            return paragraph
    return ""


def _known_licence(text: str) -> str | None:
    lowered = " ".join(text.lower().split())
    return next((licence for phrase, licence in KNOWN_LICENCE_TEXTS if phrase in lowered), None)


def refuse_reserved(packages: Iterable[str]) -> None:
    for package in packages:
        if package in RESERVED_PACKAGES:
            raise CorpusError(
                f"{package}: {RESERVED_PACKAGES[package]}; it must never be in a training "
                "corpus. Remove it from --packages."
            )


def download_deb(package: str, cache_dir: Path) -> Path:
    """The cached .deb of `package`, downloaded with `apt-get download` if missing."""
    cached = sorted(cache_dir.glob(f"{package}_*.deb"))
    if cached:
        return cached[-1]
    if shutil.which("apt-get") is None:
        raise CorpusError(
            f"{package}: apt-get not found (not a Debian/Ubuntu system). Download the .deb of "
            f"{package} by hand (packages.debian.org) into {cache_dir} and run again."
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    attempt = _apt_get(["download", package], cache_dir)
    if attempt.returncode != 0:
        # A fresh machine has no package lists yet: update once, then retry.
        _apt_get(["update"], cache_dir)
        attempt = _apt_get(["download", package], cache_dir)
    cached = sorted(cache_dir.glob(f"{package}_*.deb"))
    if attempt.returncode != 0 or not cached:
        reason = (attempt.stderr.strip().splitlines() or ["no .deb written"])[-1]
        raise CorpusError(
            f"{package}: apt-get download failed ({reason}). Check the package name and your "
            f"apt sources (apt-get update needs root), or put its .deb into {cache_dir}."
        )
    return cached[-1]


def _apt_get(arguments: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["apt-get", *arguments], cwd=cwd, capture_output=True, text=True)


def is_readable_midi(data: bytes) -> str | None:
    """None if symusic loads the bytes with at least one note, else the reason."""
    try:
        score = Score.from_midi(data)
    except RuntimeError as error:
        return f"unreadable MIDI ({error})"
    return None if score.note_num() > 0 else "no notes"


def build_debian(
    out_dir: Path,
    cache_dir: Path,
    packages: Sequence[str] = DEBIAN_PACKAGES,
    hash_root: Path | None = None,
) -> BuildReport:
    """Copy the MIDI files of Debian packages to out_dir/<package>/<name>.mid.

    A file whose bytes equal one already under `hash_root` (default out_dir: pass the corpus
    root to deduplicate across sources) is skipped. A package that cannot be had is reported
    and the others are still built.
    """
    refuse_reserved(packages)
    report = BuildReport()
    hash_root = hash_root or out_dir
    known = {sha256(p.read_bytes()): p for p in sorted(hash_root.rglob("*.mid"))}
    rows = []
    for package in packages:
        try:
            deb_path = download_deb(package, cache_dir)
            unpacked = unpack_deb(deb_path.read_bytes(), package)
        except CorpusError as error:
            report.problems.append(str(error))
            print(f"warning: {error}")
            continue
        package_dir = out_dir / package
        package_dir.mkdir(parents=True, exist_ok=True)
        if unpacked.copyright_text:
            (package_dir / "copyright").write_text(unpacked.copyright_text)
        kept = 0
        for name, content in unpacked.midi_files:
            target = package_dir / name
            digest = sha256(content)
            if digest in known and known[digest] != target:
                report.duplicates.append(
                    f"{package}/{name} = {known[digest].relative_to(hash_root)}"
                )
                continue
            problem = is_readable_midi(content)
            if problem is not None:
                report.problems.append(f"{package}/{name}: {problem}")
                continue
            kept += 1
            if target.exists():
                report.cached += 1
            else:
                target.write_bytes(content)
                report.written += 1
            known[digest] = target
        rows.append((package, unpacked.version, unpacked.licence, kept))
    write_band_sources(out_dir, rows, report)
    return report


def write_band_sources(
    out_dir: Path, rows: Sequence[tuple[str, str, str, int]], report: BuildReport
) -> None:
    lines = [
        "# Debian game and band music",
        "",
        "Built by `scripts/build_corpus.py --source debian` from Debian packages (`apt-get "
        "download`). Licence: the `Files: *` licence of each package's "
        "usr/share/doc/<package>/copyright, copied beside its MIDI files as `copyright`.",
        "openttd-openmsx is never used: it is reserved for evaluation.",
        "",
        "| package | version | licence | MIDI files |",
        "| --- | --- | --- | ---: |",
    ]
    lines += [f"| {p} | {v} | {lic} | {n} |" for p, v, lic, n in rows]
    _append_problems(lines, report)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "SOURCES.md").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# Statistics of a MIDI tree


@dataclass
class GroupStats:
    pieces: int = 0
    tracks: int = 0
    notes: int = 0
    seconds: float = 0.0
    unreadable: int = 0
    pieces_with_family: collections.Counter = field(default_factory=collections.Counter)


def instrument_family(program: int, is_drum: bool) -> str:
    instrument = program_to_instrument(program, is_drum)
    return "Drums" if instrument == DRUMS else FAMILIES[instrument // 8]


def corpus_stats(root: Path) -> dict[str, GroupStats]:
    """Per first-level folder of `root` (a source, composer or package): counts and families."""
    stats: dict[str, GroupStats] = collections.defaultdict(GroupStats)
    for path in sorted(root.rglob("*.mid")):
        group = stats[path.relative_to(root).parts[0]]
        try:
            score = Score(path)
        except RuntimeError:
            group.unreadable += 1
            continue
        group.pieces += 1
        group.tracks += len(score.tracks)
        group.notes += score.note_num()
        group.seconds += score.to("second").end()
        group.pieces_with_family.update(
            {instrument_family(t.program, t.is_drum) for t in score.tracks}
        )
    return dict(sorted(stats.items()))


def format_stats(stats: dict[str, GroupStats]) -> str:
    """Markdown tables: totals per group, then how many pieces use each instrument family."""
    total = GroupStats()
    for group in stats.values():
        total.pieces += group.pieces
        total.tracks += group.tracks
        total.notes += group.notes
        total.seconds += group.seconds
        total.unreadable += group.unreadable
        total.pieces_with_family.update(group.pieces_with_family)
    rows = {**stats, "total": total}
    lines = ["| folder | pieces | tracks | notes | hours | unreadable |", "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for name, group in rows.items():
        lines.append(
            f"| {name} | {group.pieces} | {group.tracks} | {group.notes:,} | "
            f"{group.seconds / 3600:.1f} | {group.unreadable} |"
        )
    families = [f for f in (*FAMILIES, "Drums") if total.pieces_with_family[f]]
    lines += ["", "Pieces with at least one track of each family:", ""]
    lines.append("| family | " + " | ".join(rows) + " |")
    lines.append("| --- |" + " ---: |" * len(rows))
    for family in families:
        counts = " | ".join(str(group.pieces_with_family[family]) for group in rows.values())
        lines.append(f"| {family} | {counts} |")
    return "\n".join(lines)
