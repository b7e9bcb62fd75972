"""Generate multi-track MIDI with a polyphony model.

    python generate.py --instruments "piano, bass, drums" --bars 32 -o song.mid
    python generate.py --prompt in.mid --prompt-bars 4 --bars 16 -o more.mid
    python generate.py --arrange in.mid --add "strings, drums" -o arranged.mid
    python generate.py --infill in.mid --infill-bars 9-12 --tracks "bass, drums" -o new.mid
    python generate.py --instruments "piano, violin" --num-samples 4 --seed 7 -o take.mid --plot

``--bars`` counts the bars to generate (after the prompt, if any). See docs/generation.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from contextlib import contextmanager
from pathlib import Path

from polyphony.generation import (
    GenerationError,
    common,
    generate,
    output_paths,
    parse_field_temperature,
    write_midi,
)
from polyphony.instruments import InstrumentError, instrument_name
from polyphony.metrics import track_densities
from polyphony.model import CheckpointError
from polyphony.render import RenderError, plot_piano_roll, render_wav
from polyphony.tokenizer import DecodeError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Instrument names: `python -m polyphony.instruments` lists them all.",
    )
    what = parser.add_argument_group("what to generate")
    what.add_argument("--instruments", help='instrument list, e.g. "piano, bass, drums"')
    what.add_argument("--bars", type=int, help="bars to generate (default 16)")
    what.add_argument("--prompt", metavar="MIDI", help="continue this MIDI file")
    what.add_argument(
        "--prompt-bars", type=int, metavar="N", help="use its first N bars (default all)"
    )
    what.add_argument("--arrange", metavar="MIDI", help="add instruments to this MIDI file")
    what.add_argument("--add", metavar="INSTRUMENTS", help='with --arrange: e.g. "strings, drums"')
    what.add_argument("--infill", metavar="MIDI", help="write some bars of this MIDI file again")
    what.add_argument(
        "--infill-bars", metavar="FIRST-LAST", help="with --infill: the bars, e.g. 9-12"
    )
    what.add_argument(
        "--tracks",
        metavar="INSTRUMENTS",
        help='with --infill: the tracks to write again (default all), e.g. "bass, drums"; '
        "one the piece lacks gets a part in those bars",
    )
    what.add_argument("--tempo", type=float, metavar="BPM", help="fix the tempo of a new piece")
    what.add_argument(
        "--time-signature", metavar="N/D", help='fix the meter of a new piece, e.g. "3/4"'
    )

    what.add_argument(
        "--density",
        metavar="SPEC",
        help='how much parts play: "bass=4, drums=12, piano=dense" (notes per bar, or '
        "sparse/medium/dense = the instrument's quartiles in the training data; default: its "
        "median there, or as the track plays in --prompt/--arrange)",
    )
    how = parser.add_argument_group("sampling")
    how.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    how.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0 = off)")
    how.add_argument(
        "--top-p",
        type=float,
        default=common.DEFAULT_TOP_P,
        help=f"nucleus sampling (default {common.DEFAULT_TOP_P:g}; 1.0 = off)",
    )
    how.add_argument(
        "--field-temperature",
        metavar="F=T,...",
        help="a temperature per field, e.g. pitch=0.9,duration=0.8 (REMI: pitch, velocity, duration)",
    )
    how.add_argument(
        "--steer",
        type=float,
        default=common.DEFAULT_STEER,
        help="pull each part toward its density: this many nats on its instrument's choice per "
        f"(2 + its notes per bar) notes it lags (default {common.DEFAULT_STEER:g}; 0 = the model alone)",
    )
    how.add_argument(
        "--recall",
        type=float,
        default=common.DEFAULT_RECALL,
        help="make parts come back to their phrases: this many nats on the pitches a part "
        f"began in its last {common.RECALL_BARS} bars (default {common.DEFAULT_RECALL:g}; 0 = the model alone)",
    )
    how.add_argument(
        "--loop",
        type=float,
        default=common.DEFAULT_LOOP,
        help="make parts repeat like riffs: this many nats on the pitches a part began at the "
        f"same position of one of its last {common.RECALL_BARS} bars (default {common.DEFAULT_LOOP:g} = off; at 0.45 "
        "band parts recur about as much as real ones and lose ~14 %% of their pitch-class "
        "entropy)",
    )
    how.add_argument(
        "--groove",
        type=float,
        default=common.DEFAULT_GROOVE,
        help="make the drums hold their groove: this many nats on the kit pieces they played in "
        f"their last {common.RECALL_BARS} bars, as many again on those played at the same "
        f"position (default {common.DEFAULT_GROOVE:g}; 0 = the model alone)",
    )
    how.add_argument(
        "--register",
        type=float,
        default=common.DEFAULT_REGISTER,
        help="keep parts in their instrument's register in the training data: weight of its "
        f"pitch Gaussian (default {common.DEFAULT_REGISTER:g}; 0 = any pitch, the model alone)",
    )
    how.add_argument("--seed", type=int, help="same seed, same output (default: random, printed)")
    how.add_argument("--num-samples", type=int, default=1, help="generated as one batch")
    how.add_argument("--max-tokens", type=int, help="cap on the tokens the model writes")
    how.add_argument(
        "--time-limit", type=float, metavar="S", help="stop with an error after S seconds"
    )

    run = parser.add_argument_group("model and output")
    run.add_argument(
        "-o", "--output", default="song.mid", help="MIDI file (several: song_0.mid, ...)"
    )
    run.add_argument(
        "--checkpoint", metavar="DIR", help=f"model directory (default {common.DEFAULT_CHECKPOINT})"
    )
    run.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    run.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (default 1: one decode step is too small to split, and a second "
        "thread mostly waits; raise it for large --num-samples)",
    )
    run.add_argument("--compile", action="store_true", help="torch.compile the decoder blocks")
    run.add_argument("--render", choices=["wav"], help="also write a WAV next to each MIDI file")
    run.add_argument("--soundfont", metavar="SF2", help="General MIDI soundfont for --render")
    run.add_argument("--plot", action="store_true", help="also write a piano-roll PNG")
    run.add_argument("--quiet", action="store_true", help="no progress bar or notes")
    return parser


@contextmanager
def notes_on_stderr(quiet: bool):
    """polyphony's notes (the seed, collapsed duplicates, ...) on stderr while the command runs;
    nothing is left configured afterwards (``main`` is also called in-process, by tests)."""
    logger = logging.getLogger("polyphony")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with notes_on_stderr(args.quiet):
        return run(args)


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(max(1, args.threads))
    try:
        scores = generate(
            instruments=args.instruments,
            bars=args.bars,
            prompt=args.prompt,
            prompt_bars=args.prompt_bars,
            arrange=args.arrange,
            add=args.add,
            infill=args.infill,
            infill_bars=args.infill_bars,
            tracks=args.tracks,
            tempo=args.tempo,
            time_signature=args.time_signature,
            density=args.density,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            field_temperature=parse_field_temperature(args.field_temperature),
            steer=args.steer,
            recall=args.recall,
            loop=args.loop,
            groove=args.groove,
            register=args.register,
            num_samples=args.num_samples,
            max_tokens=args.max_tokens,
            seed=args.seed,
            checkpoint=args.checkpoint,
            device=args.device,
            compile=args.compile,
            progress=not args.quiet,
            time_limit=args.time_limit,
        )
        scores = scores if isinstance(scores, list) else [scores]
        for score, path in zip(scores, output_paths(args.output, len(scores)), strict=True):
            print(write_midi(score, path))
            for instrument, (notes, per_bar) in track_densities(score).items():
                print(f"  {instrument_name(instrument):<28} {notes:5d} notes  {per_bar:5.1f}/bar")
            if args.render == "wav":
                print(render_wav(score, path.with_suffix(".wav"), args.soundfont))
            if args.plot:
                print(plot_piano_roll(score, path.with_suffix(".png"), title=Path(path).name))
    except (
        GenerationError,
        InstrumentError,
        CheckpointError,
        DecodeError,
        RenderError,
        OSError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
