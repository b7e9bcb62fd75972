"""Build the development MIDI corpus (see docs/data.md).

    python scripts/build_corpus.py --source all --out corpus          # corpus/music21 + corpus/band
    python scripts/build_corpus.py --source music21 --limit 20        # a quick run
    python scripts/build_corpus.py --source debian --out corpus/band  # writes into that folder
    python scripts/build_corpus.py --stats --out corpus               # numbers only, no build

Works and files already written are skipped, so an interrupted build resumes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from polyphony.corpus import (  # noqa: E402
    DEBIAN_PACKAGES,
    BuildReport,
    CorpusError,
    build_debian,
    build_music21,
    corpus_stats,
    format_stats,
    refuse_reserved,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--source", choices=["all", "music21", "debian"], default="all")
    parser.add_argument(
        "--out",
        type=Path,
        help="corpus root for --source all (default corpus/); the folder itself for one source "
        "(default corpus/music21 or corpus/band)",
    )
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/polyphony/debs",
                        help="where downloaded .deb files are kept (default %(default)s)")  # fmt: skip
    parser.add_argument("--packages", nargs="+", default=list(DEBIAN_PACKAGES),
                        help="Debian packages to take MIDI from (default: the documented list)")  # fmt: skip
    parser.add_argument("--limit", type=int, help="export only the first N music21 works")
    parser.add_argument("--workers", type=int, default=2, help="music21 worker processes")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds one music21 work may take before it is skipped")  # fmt: skip
    parser.add_argument("--stats", action="store_true", help="only print the statistics of --out")
    return parser.parse_args(argv)


def print_report(name: str, report: BuildReport, seconds: float) -> None:
    print(
        f"{name}: {report.written} written, {report.cached} already there, "
        f"{len(report.problems)} skipped, {len(report.duplicates)} duplicates removed "
        f"in {seconds:.0f} s"
    )
    for problem in report.problems:
        print(f"  skipped {problem}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.source == "all":
        root = args.out or Path("corpus")
        targets = {"music21": root / "music21", "debian": root / "band"}
    else:
        default = Path("corpus") / ("band" if args.source == "debian" else "music21")
        root = args.out or default
        targets = {args.source: root}
    if not args.stats:
        try:
            refuse_reserved(args.packages)
            if "music21" in targets:
                start = time.monotonic()
                report = build_music21(targets["music21"], args.limit, args.workers, args.timeout)
                print_report("music21", report, time.monotonic() - start)
            if "debian" in targets:
                start = time.monotonic()
                report = build_debian(targets["debian"], args.cache, args.packages, hash_root=root)
                print_report("debian", report, time.monotonic() - start)
        except CorpusError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    if not root.is_dir():
        print(f"error: {root} does not exist: build it first (without --stats)", file=sys.stderr)
        return 2
    print(format_stats(corpus_stats(root)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
