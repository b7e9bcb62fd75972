"""Session fixtures: the real MIDI fixture folder, and datasets prepared from it once.

``prepared_remi`` / ``prepared_cpword`` run the real pipeline (``prepare_dataset`` with one
isolated worker) on ``tests/fixtures/midi`` into a temporary folder. The split fractions are
raised from the defaults (5 % / 5 %) to ``PREPARED_FRACTIONS`` so that a few dozen fixture files
still put pieces in validation (and most likely test); the fixture fails loudly if train or
validation ends up empty.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The suite's models are tiny: one thread is faster than two (a second thread mostly waits, and
# on a busy 2-core machine it waits a lot). Subprocesses started by tests inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from polyphony.config import DataConfig
from polyphony.data.midi_input import MIDI_SUFFIXES
from polyphony.data.prepare import prepare_dataset

FIXTURE_MIDI_DIR = Path(__file__).parent / "fixtures" / "midi"
PREPARED_FRACTIONS = {"validation_fraction": 0.2, "test_fraction": 0.1}


@pytest.fixture(scope="session")
def fixture_midi_dir() -> Path:
    """tests/fixtures/midi: real files in music21/ and band/ subfolders."""
    if not any(p.suffix.lower() in MIDI_SUFFIXES for p in FIXTURE_MIDI_DIR.rglob("*")):
        pytest.fail(f"{FIXTURE_MIDI_DIR}: no MIDI fixtures (the repository ships them)")
    return FIXTURE_MIDI_DIR


def _prepare(kind: str, midi_dir: Path, tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp(f"prepared_{kind}")
    config = DataConfig(tokenization=kind, **PREPARED_FRACTIONS)
    summary = prepare_dataset(midi_dir, out_dir, config, workers=1, progress=False)
    empty = [split for split in ("train", "validation") if summary.pieces[split] == 0]
    if empty:
        raise RuntimeError(
            f"prepared {midi_dir} has no {', '.join(empty)} pieces: "
            f"adjust PREPARED_FRACTIONS in {__file__}"
        )
    return out_dir


@pytest.fixture(scope="session")
def prepared_remi(fixture_midi_dir, tmp_path_factory) -> Path:
    """A dataset folder (shards, manifest, tokenizer.json) of the fixtures, REMI tokens."""
    return _prepare("remi", fixture_midi_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def prepared_cpword(fixture_midi_dir, tmp_path_factory) -> Path:
    """The same fixtures as CPWord compounds."""
    return _prepare("cpword", fixture_midi_dir, tmp_path_factory)
