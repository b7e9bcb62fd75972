"""A local web studio: ``polyphony serve`` (or ``python -m polyphony.serve``), then open the URL.

One page (``polyphony/studio/``) to generate, continue, arrange and infill, with a piano roll, in-page
playback and a MIDI download; the HTTP API under it serves scripts and DAW bridges too:

    POST /api/generate   JSON {instruments, bars, tempo, time_signature, density, temperature,
                         top_p, seed}                    -> audio/midi
    POST /api/continue   multipart: file + bars, prompt_bars, instruments, density, ...
    POST /api/arrange    multipart: file + add, density, ...
    POST /api/infill     multipart: file + bars ("9-12"), tracks, density, ...
    POST /api/notes      multipart: file -> JSON tracks and notes (what the page draws)
    GET  /api/instruments, /api/model

FastAPI + uvicorn: typed request models validated for us, a test client for the API tests,
and a server that needs nothing beyond PyPI; everything the page uses (HTML, JS, CSS) is served
from the package, so it works offline.

Safe by default: it binds 127.0.0.1; an upload is at most ``MAX_UPLOAD_BYTES`` and is read as
every user file is (polyphony.data.midi_input: validated, never written to disk); one model
stays loaded and one worker thread decodes, so requests queue (at most ``MAX_WAITING`` wait,
then 503) and cannot interleave; each has a time limit. No path comes from the client. Every
error is ``{"error": "one line"}`` with a 4xx or 5xx status.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

try:
    from fastapi import FastAPI, File, Form, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from pydantic import BaseModel
except ImportError as err:  # an optional extra
    raise ImportError('the studio needs its extra: pip install -e ".[studio]"') from err

import torch
from symusic import Score

from .data.midi_input import MidiInputError, load_midi
from .generation import (
    DEFAULT_TOP_P,
    GenerationError,
    compile_decoder,
    generate,
    load_checkpoint,
    midi_bytes,
)
from .instruments import ALIASES, DRUMS, GM_NAMES, InstrumentError, instrument_name
from .metrics import bar_lines

STUDIO_DIR = Path(__file__).resolve().parent / "studio"
MAX_UPLOAD_BYTES = 4 * 2**20  # real MIDI files are KBs; a few MB is a long orchestral piece
TIME_LIMIT_S = 120.0  # per request, of decoding
MAX_WAITING = 16  # requests queued behind the one decoding; more are told to come back
MIDI = "audio/midi"


class Busy(Exception):
    """The queue is full."""


class Worker:
    """One thread that runs every generation in arrival order: one model in memory, no two
    requests sharing it at once, and a bounded line of waiting requests."""

    def __init__(self, max_waiting: int = MAX_WAITING):
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="polyphony")
        self.max_waiting = max_waiting
        self.pending = 0
        self.lock = threading.Lock()

    async def run(self, function, *args, **kwargs):
        with self.lock:
            if self.pending > self.max_waiting:
                raise Busy()
            self.pending += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.executor, lambda: function(*args, **kwargs))
        finally:
            with self.lock:
                self.pending -= 1


def instrument_catalogue() -> list[dict[str, Any]]:
    """Every GM program and the drum kit, with the short names people type for them."""
    aliases: dict[int, list[str]] = {}
    for alias, instrument in ALIASES.items():
        aliases.setdefault(instrument, []).append(alias)
    ids = [*range(len(GM_NAMES)), DRUMS]
    return [{"id": i, "name": instrument_name(i), "aliases": aliases.get(i, [])} for i in ids]


def score_notes(score: Score) -> dict[str, Any]:
    """A score as the page draws and plays it: beats, tempo, bar lines, tracks of notes."""
    tpq = score.ticks_per_quarter
    end = max((t.end() for t in score.tracks if t.notes), default=0)
    starts, _ = bar_lines(score, tpq, end + 1)
    tracks = []
    for track in score.tracks:
        if not track.notes:
            continue
        instrument = DRUMS if track.is_drum else track.program
        notes = track.notes.numpy()
        tracks.append(
            {
                "instrument": instrument,
                "name": instrument_name(instrument),
                "notes": [
                    [round(t / tpq, 4), round(d / tpq, 4), int(p), int(v)]
                    for t, d, p, v in zip(
                        notes["time"], notes["duration"], notes["pitch"], notes["velocity"],
                        strict=True,
                    )
                ],
            }
        )  # fmt: skip
    qpm = float(score.tempos[0].qpm) if len(score.tempos) else 120.0
    return {
        "qpm": qpm,
        "beats": round(end / tpq, 4),
        "bars": [round(float(s) / tpq, 4) for s in starts],
        "tracks": tracks,
    }


class Options(BaseModel):
    """The body of POST /api/generate: generate()'s arguments of a new piece."""

    instruments: str | list[str | int]
    bars: int = 16
    tempo: float | None = None
    time_signature: str | None = None
    density: str | dict[str, str | float] | None = None
    temperature: float = 1.0
    top_p: float = DEFAULT_TOP_P
    seed: int | None = None


Upload = Annotated[UploadFile, File()]


def create_app(
    checkpoint: str | Path | None = None, time_limit: float = TIME_LIMIT_S, compile: bool = False
) -> FastAPI:
    """The studio's FastAPI app around one loaded model (default: the shipped one).

    ``compile``: torch.compile the decode step before serving (compile_decoder), and trace it
    with one short piece, so that no request pays the compile (20-60 s) under its time limit:
    a server keeps its model, which is where compiling pays (docs/generation.md, "Speed")."""
    loaded = load_checkpoint(checkpoint)
    if compile:
        compile_decoder(loaded.model)
        # Every request decodes one row into a cache of the model's length: one graph.
        generate("piano", bars=1, seed=0, checkpoint=loaded)
    worker = Worker()
    app = FastAPI(title="polyphony studio", docs_url=None, redoc_url=None)
    app.mount("/static", StaticFiles(directory=STUDIO_DIR), name="static")

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        return error(422, f"{where}: {first.get('msg', 'invalid value')}")

    async def respond(**request) -> Response:
        try:
            score = await worker.run(generate, **request, checkpoint=loaded, time_limit=time_limit)
            data = midi_bytes(score)
        except Busy:
            return error(503, f"busy: {MAX_WAITING} requests are waiting; try again shortly")
        except (GenerationError, InstrumentError, MidiInputError) as err:
            return error(400, str(err))
        headers = {"Content-Disposition": 'attachment; filename="polyphony.mid"'}
        return Response(data, media_type=MIDI, headers=headers)

    async def upload(file: UploadFile):
        """The uploaded MIDI as a validated Score, or an error response."""
        data = await file.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            return error(413, f"upload larger than {MAX_UPLOAD_BYTES // 2**20} MB")
        name = Path(file.filename or "upload.mid").name  # for messages only; never a path
        try:
            score, _ = load_midi(data, name)
        except MidiInputError as err:
            return error(400, str(err))
        return score

    def sampling(density, temperature, top_p, seed) -> dict[str, Any]:
        return {"density": density, "temperature": temperature, "top_p": top_p, "seed": seed}

    @app.get("/")
    async def page():
        return FileResponse(STUDIO_DIR / "index.html")

    @app.get("/api/instruments")
    async def instruments():
        return instrument_catalogue()

    @app.get("/api/model")
    async def model():
        return {
            "checkpoint": str(loaded.path),
            "parameters": loaded.model.num_parameters(),
            "tokenization": loaded.tokenizer.kind,
            "time_limit_s": time_limit,
            "max_upload_bytes": MAX_UPLOAD_BYTES,
            # The page's sampling fields start from generate()'s own defaults.
            "top_p": DEFAULT_TOP_P,
        }

    @app.post("/api/generate")
    async def generate_piece(options: Options):
        return await respond(**options.model_dump())

    @app.post("/api/continue")
    async def continue_piece(
        file: Upload,
        bars: Annotated[int, Form()] = 8,
        prompt_bars: Annotated[int | None, Form()] = None,
        instruments: Annotated[str | None, Form()] = None,
        density: Annotated[str | None, Form()] = None,
        temperature: Annotated[float, Form()] = 1.0,
        top_p: Annotated[float, Form()] = DEFAULT_TOP_P,
        seed: Annotated[int | None, Form()] = None,
    ):
        prompt = await upload(file)
        if isinstance(prompt, Response):
            return prompt
        return await respond(
            prompt=prompt, prompt_bars=prompt_bars, bars=bars, instruments=instruments or None,
            **sampling(density, temperature, top_p, seed),
        )  # fmt: skip

    @app.post("/api/arrange")
    async def arrange_piece(
        file: Upload,
        add: Annotated[str, Form()],
        density: Annotated[str | None, Form()] = None,
        temperature: Annotated[float, Form()] = 1.0,
        top_p: Annotated[float, Form()] = DEFAULT_TOP_P,
        seed: Annotated[int | None, Form()] = None,
    ):
        piece = await upload(file)
        if isinstance(piece, Response):
            return piece
        return await respond(arrange=piece, add=add, **sampling(density, temperature, top_p, seed))

    @app.post("/api/infill")
    async def infill_piece(
        file: Upload,
        bars: Annotated[str, Form()],
        tracks: Annotated[str | None, Form()] = None,
        density: Annotated[str | None, Form()] = None,
        temperature: Annotated[float, Form()] = 1.0,
        top_p: Annotated[float, Form()] = DEFAULT_TOP_P,
        seed: Annotated[int | None, Form()] = None,
    ):
        piece = await upload(file)
        if isinstance(piece, Response):
            return piece
        return await respond(
            infill=piece, infill_bars=bars, tracks=tracks or None,
            **sampling(density, temperature, top_p, seed),
        )  # fmt: skip

    @app.post("/api/notes")
    async def notes(file: Upload):
        score = await upload(file)
        return score if isinstance(score, Response) else score_notes(score)

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="polyphony serve", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--checkpoint", help="model directory (default: the shipped model)")
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT_S, help="seconds")
    parser.add_argument(
        "--compile", action="store_true",
        help="torch.compile the decode step at startup (20-60 s once): requests decode faster",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=1,
        help="CPU threads (default 1, as generate.py: a decode step is too small to split)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    import uvicorn

    torch.set_num_threads(max(1, args.threads))

    if args.compile:
        print("compiling the decode step (20-60 s, once)...", file=sys.stderr)
    try:
        app = create_app(args.checkpoint, args.time_limit, args.compile)
    except GenerationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"polyphony studio: http://{args.host}:{args.port}/")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
