"""Export one style of music21's corpus that the development corpus leaves out, to fine-tune on
and to test the fine-tune with (docs/training.md#fine-tuning):

    python scripts/export_style.py --collection ryansMammoth --program 110 \
        --train 20 --held-out 20 --out runs/style-fiddle

Ryan's Mammoth Collection (1883) is a book of fiddle tunes (reels, hornpipes, jigs,
strathspeys), one ABC file per tune; scripts/build_corpus.py takes only music21's multi-part
works, so none of it is in the training data. Tunes are taken in file-name order, every other
one to each folder, written as one track of GM ``--program`` through the corpus builder's
converter (polyphony.corpus.music21_to_score).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from polyphony.corpus import Music21Work, music21_to_score, parse_music21_work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--collection", default="ryansMammoth")
    parser.add_argument("--program", type=int, default=110, help="GM program (110: Fiddle)")
    parser.add_argument("--train", type=int, default=20)
    parser.add_argument("--held-out", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from music21 import corpus

    root = Path(corpus.getComposer(args.collection)[0]).parent
    files = sorted(root.glob("*.abc"))
    wanted = {"train": args.train, "held_out": args.held_out}
    written = {name: 0 for name in wanted}
    for index, path in enumerate(files):
        folder = "train" if index % 2 == 0 else "held_out"
        if all(written[k] >= wanted[k] for k in wanted):
            break
        if written[folder] >= wanted[folder]:
            continue
        score = music21_to_score(parse_music21_work(Music21Work(f"{args.collection}/{path.name}")))
        score.tracks = [t for t in score.tracks if t.notes][:1]
        if not score.tracks or score.note_num() < 32:
            continue
        score.tracks[0].program = args.program
        target = args.out / folder / f"{path.stem}.mid"
        target.parent.mkdir(parents=True, exist_ok=True)
        score.dump_midi(target)
        written[folder] += 1
    print(f"{args.out}: {written['train']} train, {written['held_out']} held-out tunes")


if __name__ == "__main__":
    main()
