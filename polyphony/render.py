"""Optional outputs to listen to and look at: a WAV through a General MIDI soundfont, and a
piano-roll PNG.

Nothing here touches the network. symusic's ``Synthesizer()`` *without* a soundfont path
downloads one, so it is only ever given a file: ``--soundfont``, ``$POLYPHONY_SOUNDFONT``, or a
soundfont that a system package installed (Debian/Ubuntu: ``fluid-soundfont-gm``). The plot
needs matplotlib, from the ``render`` extra (``pip install 'polyphony[render]'``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from symusic import Score, Synthesizer, dump_wav

from .instruments import program_to_instrument

SOUNDFONT_ENV = "POLYPHONY_SOUNDFONT"
# Where distribution packages put a General MIDI soundfont (fluid-soundfont-gm, timgm6mb,
# musescore-general-soundfont, Homebrew's fluid-synth).
SYSTEM_SOUNDFONTS = (
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",
    "/usr/share/sounds/sf2/default-GM.sf2",
    "/usr/share/sounds/sf2/TimGM6mb.sf2",
    "/usr/share/sounds/sf3/default-GM.sf3",
    "/usr/share/sounds/sf3/MuseScore_General.sf3",
    "/usr/share/soundfonts/FluidR3_GM.sf2",
    "/usr/share/soundfonts/default.sf2",
    "/usr/local/share/soundfonts/default.sf2",
    "/opt/homebrew/share/soundfonts/default.sf2",
)
SAMPLE_RATE = 44_100


class RenderError(RuntimeError):
    """A WAV or PNG that cannot be made here; the one-line message says what to install."""


def find_soundfont(soundfont: str | Path | None = None) -> Path:
    """The soundfont to use: the one given, else ``$POLYPHONY_SOUNDFONT``, else a system one."""
    if soundfont is not None:
        path = Path(soundfont)
        if not path.is_file():
            raise RenderError(f"{path}: soundfont not found (expected an .sf2 or .sf3 file)")
        return path
    if os.environ.get(SOUNDFONT_ENV):
        return find_soundfont(os.environ[SOUNDFONT_ENV])
    for candidate in SYSTEM_SOUNDFONTS:
        if Path(candidate).is_file():
            return Path(candidate)
    raise RenderError(
        "no General MIDI soundfont found for --render wav: install one (Debian/Ubuntu: "
        "`sudo apt-get install fluid-soundfont-gm`; macOS: `brew install fluid-synth`) or pass "
        f"--soundfont FILE.sf2 (or set ${SOUNDFONT_ENV})"
    )


def render_wav(score: Score, path: str | Path, soundfont: str | Path | None = None) -> Path:
    """Synthesize ``score`` to a 16-bit stereo WAV at 44.1 kHz.

    The ``fluidsynth`` program is used when installed; otherwise symusic's built-in synthesizer,
    whose result conversion fails on some installs (symusic 0.6.0 with numpy 2 here: "Unable
    to convert function return value"), hence the preference.
    """
    font = find_soundfont(soundfont)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program = shutil.which("fluidsynth")
    if program:
        return _render_with_fluidsynth(program, score, path, font)
    try:
        synthesizer = Synthesizer(sf_path=str(font), sample_rate=SAMPLE_RATE)
        audio = synthesizer.render(score, stereo=True)
    except (RuntimeError, TypeError) as err:
        raise RenderError(
            f"symusic's synthesizer failed ({' '.join(str(err).split())[:120]}); install the "
            "fluidsynth program (Debian/Ubuntu: `sudo apt-get install fluidsynth`; macOS: "
            "`brew install fluid-synth`) and retry"
        ) from err
    dump_wav(str(path), np.asfortranarray(audio, dtype=np.float32), SAMPLE_RATE, use_int16=True)
    return path


def _render_with_fluidsynth(program: str, score: Score, path: Path, font: Path) -> Path:
    with tempfile.TemporaryDirectory() as scratch:
        midi = Path(scratch) / "score.mid"
        score.dump_midi(str(midi))
        command = [program, "-ni", "-q", "-F", str(path), "-r", str(SAMPLE_RATE), "-T", "wav",
                   "-O", "s16", str(font), str(midi)]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not path.is_file():
        reason = " ".join((result.stderr or result.stdout).split())[:200]
        raise RenderError(f"{path}: fluidsynth failed (exit {result.returncode}: {reason})")
    return path


def plot_piano_roll(score: Score, path: str | Path, title: str | None = None) -> Path:
    """A PNG piano roll: time in quarter notes, pitch, one colour per instrument."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise RenderError(
            "--plot needs matplotlib: `pip install 'polyphony[render]'` (or `pip install matplotlib`)"
        ) from err
    quarters = score.to("quarter")
    # A Figure without pyplot: no global backend or state is touched in the caller's process.
    figure = Figure(figsize=(14, 6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    palette = [tuple(c) for c in _palette(len(quarters.tracks))]
    for track, colour in zip(quarters.tracks, palette, strict=True):
        notes = track.notes.numpy()
        if len(notes["time"]) == 0:
            continue
        instrument = program_to_instrument(track.program, track.is_drum)
        axes.barh(
            notes["pitch"].astype(float),
            notes["duration"],
            left=notes["time"],
            height=0.8,
            color=colour,
            edgecolor="none",
            label=f"{track.name or instrument} ({'drums' if track.is_drum else track.program})",
        )
    for downbeat in _downbeats(score):
        axes.axvline(downbeat, color="0.85", linewidth=0.6, zorder=0)
    axes.set_xlabel("time (quarter notes)")
    axes.set_ylabel("MIDI pitch (drums: GM drum key)")
    pitches = [t.notes.numpy()["pitch"] for t in quarters.tracks if t.notes]
    if pitches:
        low, high = int(min(p.min() for p in pitches)), int(max(p.max() for p in pitches))
        axes.set_ylim(max(low - 3, 0), min(high + 4, 128))
    axes.set_xlim(left=0)
    if title:
        axes.set_title(title)
    if quarters.tracks:
        axes.legend(loc="upper right", fontsize="small", framealpha=0.8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def _palette(count: int) -> np.ndarray:
    """Distinct colours: matplotlib's tab20 order (dark/light pairs de-interleaved)."""
    from matplotlib import colormaps

    table = colormaps["tab20"](np.arange(20))
    ordered = np.concatenate([table[0::2], table[1::2]])
    return ordered[np.arange(count) % len(ordered)]


def _downbeats(score: Score) -> np.ndarray:
    """Bar lines in quarter notes (for the plot's grid)."""
    tpq = score.ticks_per_quarter
    return np.asarray(score.get_downbeats(), dtype=float) / tpq if tpq else np.empty(0)
