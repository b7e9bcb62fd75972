"""Measure what REMI / CPWord tokenization loses on a folder of MIDI files (docs/tokenization.md).

    python scripts/measure_tokenization.py                    # corpus/ if built, else the fixtures
    python scripts/measure_tokenization.py MIDI_DIR --tokenization remi --limit 200 --json out.json

Every file is encoded and decoded again; the decoded notes are compared with the original ones,
per instrument (tracks of one program merged, as the tokenizer does) and per pitch, the k-th
onset of a pitch against the k-th (quantisation is monotone, so this pairs each note with its
own image). Times are measured in *beats*: the time signature's denominator in force at the
note (a quarter in x/4, an eighth in x/8), the unit of miditok's grid. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from symusic import Score  # noqa: E402

from polyphony.instruments import program_to_instrument  # noqa: E402
from polyphony.tokenizer import PolyTokenizer, TokenizationError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAX_BEATS = 12  # miditok's longest Duration token with the default beat_res


def default_midi_dir() -> Path:
    corpus = REPO / "corpus"
    return corpus if corpus.is_dir() else REPO / "tests" / "fixtures" / "midi"


def beats_at(score: Score, ticks: np.ndarray) -> np.ndarray:
    """Beat length in quarters (4 / denominator) in force at each tick; 4/4 before the first."""
    signatures = sorted((ts.time, ts.denominator) for ts in score.time_signatures)
    if not signatures or signatures[0][0] > 0:
        signatures.insert(0, (0, 4))
    times = np.array([t for t, _ in signatures])
    lengths = np.array([4 / max(d, 1) for _, d in signatures])
    return lengths[np.searchsorted(times, ticks, side="right") - 1]


def tempo_at(score: Score, ticks: np.ndarray) -> np.ndarray:
    tempos = sorted((t.time, t.qpm) for t in score.tempos) or [(0, 120.0)]
    times = np.array([t for t, _ in tempos])
    qpm = np.array([q for _, q in tempos])
    return qpm[np.clip(np.searchsorted(times, ticks, side="right") - 1, 0, None)]


def notes_by_key(score: Score) -> dict[tuple[int, int], dict[str, np.ndarray]]:
    """(instrument, pitch) -> onsets/durations (quarters), velocities and beat (quarters), in
    order of (onset on the 1/8-beat grid, duration): two notes whose onsets snap to the same
    grid point then pair up by duration in the original and in the decoded score alike."""
    parts: dict[tuple[int, int], dict[str, list]] = defaultdict(lambda: defaultdict(list))
    tpq = score.ticks_per_quarter
    for track in score.tracks:
        notes = track.notes.numpy()
        if not len(notes["time"]):
            continue
        instrument = program_to_instrument(track.program, track.is_drum)
        pitches = notes["pitch"].astype(np.int64)
        beats = beats_at(score, notes["time"])
        for pitch in np.unique(pitches):
            chosen = pitches == pitch
            group = parts[(instrument, int(pitch))]
            group["onset"].append(notes["time"][chosen] / tpq)
            group["duration"].append(notes["duration"][chosen] / tpq)
            group["velocity"].append(notes["velocity"][chosen].astype(np.int64))
            group["beat"].append(beats[chosen])
    result = {}
    for key, fields in parts.items():
        arrays = {name: np.concatenate(values) for name, values in fields.items()}
        step = arrays["beat"] / 8
        grid_onset = np.floor(arrays["onset"] / step + 0.5) * step  # halves up, like symusic
        order = np.lexsort((arrays["duration"], grid_onset))
        result[key] = {name: values[order] for name, values in arrays.items()}
    return result


class Totals:
    """Counters and error samples over all files."""

    def __init__(self):
        self.count = Counter()
        self.refused_meters = Counter()
        self.errors: dict[str, list[np.ndarray]] = defaultdict(list)
        self.worst: dict[str, tuple[float, str]] = {}  # error -> (largest value, file)
        self.failures: list[str] = []

    def add_error(self, name: str, values: np.ndarray, file: str) -> None:
        self.errors[name].append(values)
        if len(values) and values.max() > self.worst.get(name, (-1.0, ""))[0]:
            self.worst[name] = (float(values.max()), file)

    def add_file(self, file: str, score: Score, decoded: Score) -> None:
        count = self.count
        count["files tokenized"] += 1
        tracks = [t for t in score.tracks if t.note_num()]
        identities = Counter(program_to_instrument(t.program, t.is_drum) for t in tracks)
        merged = sum(n - 1 for n in identities.values())
        count["tracks with notes"] += len(tracks)
        count["tracks merged into another of the same program"] += merged
        count["files with merged tracks"] += merged > 0
        count["drum tracks"] += sum(t.is_drum for t in tracks)
        count["named tracks (names replaced by GM names)"] += sum(
            bool(t.name.strip()) for t in tracks
        )
        count["control changes dropped"] += sum(len(t.controls) for t in score.tracks)
        count["pedals dropped"] += sum(len(t.pedals) for t in score.tracks)
        count["pitch bends dropped"] += sum(len(t.pitch_bends) for t in score.tracks)
        count["key signatures dropped"] += len(score.key_signatures)
        count["lyrics dropped"] += sum(len(t.lyrics) for t in score.tracks)

        # Each tempo change against the decoded tempo at its place on the grid (changes closer
        # than a grid step collapse into the last one: that is a real loss, counted here).
        tempo_ticks = np.array([t.time for t in score.tempos], dtype=np.int64)
        if len(tempo_ticks):
            beat = beats_at(score, tempo_ticks)
            step = beat / 8 * score.ticks_per_quarter
            snapped = np.round(tempo_ticks / step) * step / score.ticks_per_quarter
            decoded_qpm = tempo_at(decoded, np.round(snapped * decoded.ticks_per_quarter))
            original_qpm = np.array([t.qpm for t in score.tempos])
            self.add_error("tempo changes (qpm)", np.abs(decoded_qpm - original_qpm), file)

        before, after = notes_by_key(score), notes_by_key(decoded)
        count["notes in"] += sum(len(g["onset"]) for g in before.values())
        count["notes out"] += sum(len(g["onset"]) for g in after.values())
        count["drum notes in"] += sum(len(g["onset"]) for k, g in before.items() if k[0] == 128)
        count["drum notes out"] += sum(len(g["onset"]) for k, g in after.items() if k[0] == 128)
        for key, want in before.items():
            have = after.get(key)
            if have is None or len(have["onset"]) != len(want["onset"]):
                count["(instrument, pitch) groups whose note count changed"] += 1
                continue
            beat = want["beat"]
            onset_error = np.abs(have["onset"] - want["onset"]) / beat
            long_notes = want["duration"] > MAX_BEATS * beat
            count["notes longer than 12 beats (clipped)"] += int(long_notes.sum())
            kept = ~long_notes
            self.add_error("onset (beats)", onset_error, file)
            self.add_error(
                "duration, unclipped notes (beats)",
                np.abs(have["duration"][kept] - want["duration"][kept]) / beat[kept],
                file,
            )
            self.add_error(
                "duration lost by clipped notes (beats)",
                (want["duration"][long_notes] - have["duration"][long_notes]) / beat[long_notes],
                file,
            )
            # Unison notes (merged tracks) may pair up in either order: compare velocities as
            # sorted lists, which the (monotone) binning maps onto each other.
            velocity_error = np.sort(have["velocity"]) - np.sort(want["velocity"])
            self.add_error("velocity", np.abs(velocity_error), file)

    def table(self, title: str) -> str:
        lines = [f"### {title}", "", "| measure | value |", "| --- | --- |"]
        for name, value in self.count.items():
            lines.append(f"| {name} | {value:,} |")
        if self.count["notes in"]:
            kept = self.count["notes out"] / self.count["notes in"]
            lines.append(f"| notes out / notes in | {kept:.4%} |")
        for meter, n in sorted(self.refused_meters.items()):
            lines.append(f"| files refused: meter {meter} not in vocabulary | {n:,} |")
        lines += [
            "",
            "| error (decoded vs original) | mean | p99 | max | share that moved | max in |",
        ]
        lines.append("| --- | --- | --- | --- | --- | --- |")
        for name, parts in self.errors.items():
            values = np.concatenate(parts) if parts else np.zeros(0)
            if not len(values):
                continue
            moved = float((values > 1e-9).mean())
            lines.append(
                f"| {name} | {values.mean():.4f} | {np.quantile(values, 0.99):.4f} | "
                f"{values.max():.4f} | {moved:.2%} | {self.worst.get(name, (0, '-'))[1]} |"
            )
        return "\n".join(lines)

    def as_json(self) -> dict:
        errors = {}
        for name, parts in self.errors.items():
            values = np.concatenate(parts) if parts else np.zeros(0)
            if len(values):
                errors[name] = {"mean": float(values.mean()), "max": float(values.max()),
                                "p99": float(np.quantile(values, 0.99)),
                                "max_in": self.worst.get(name, (0, None))[1]}  # fmt: skip
        return {"counts": dict(self.count), "refused_meters": dict(self.refused_meters),
                "errors": errors, "failures": self.failures}  # fmt: skip


def measure(paths: list[Path], root: Path, tokenizer: PolyTokenizer, max_notes: int) -> Totals:
    totals = Totals()
    for path in paths:
        name = path.relative_to(root).as_posix()
        totals.count["files found"] += 1
        try:
            score = Score(path)
        except (RuntimeError, ValueError) as err:
            totals.count["files that do not load"] += 1
            totals.failures.append(f"{name}: load: {err}")
            continue
        if score.note_num() == 0 or score.note_num() > max_notes:
            totals.count[f"files with 0 or > {max_notes:,} notes (not measured)"] += 1
            continue
        try:
            encoded = tokenizer.encode(score)
        except TokenizationError as err:
            totals.count["files refused by the tokenizer"] += 1
            unsupported = {
                f"{ts.numerator}/{ts.denominator}"
                for ts in score.time_signatures
                if (ts.numerator, ts.denominator) not in tokenizer.miditok.time_signatures
            }
            for meter in unsupported or {"(none)"}:
                totals.refused_meters[meter] += 1
            totals.failures.append(f"{name}: {err}")
            continue
        totals.count["tokens (header + body + EOS)"] += len(encoded)
        totals.add_file(name, score, tokenizer.decode(encoded.ids))
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("midi_dir", nargs="?", type=Path, default=default_midi_dir())
    parser.add_argument("--tokenization", choices=["remi", "cpword", "both"], default="both")
    parser.add_argument("--limit", type=int, help="measure only the first N files (sorted)")
    parser.add_argument("--max-notes", type=int, default=100_000, help="skip larger files")
    parser.add_argument("--json", type=Path, help="also write the numbers as JSON here")
    args = parser.parse_args(argv)
    if not args.midi_dir.is_dir():
        print(
            f"error: {args.midi_dir}: no such folder (give a folder of MIDI files)", file=sys.stderr
        )
        return 1
    suffixes = {".mid", ".midi", ".kar"}
    paths = sorted(p for p in args.midi_dir.rglob("*") if p.suffix.lower() in suffixes)
    paths = paths[: args.limit] if args.limit else paths
    kinds = ["remi", "cpword"] if args.tokenization == "both" else [args.tokenization]
    print(f"{len(paths)} MIDI files under {args.midi_dir}\n")
    results = {}
    for kind in kinds:
        tokenizer = PolyTokenizer.build(kind)
        started = time.monotonic()
        totals = measure(paths, args.midi_dir, tokenizer, args.max_notes)
        seconds = time.monotonic() - started
        print(totals.table(f"{kind} (tokenizer {tokenizer.hash}, {seconds:.1f} s)") + "\n")
        results[kind] = totals.as_json()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
