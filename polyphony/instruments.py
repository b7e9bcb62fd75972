"""The General MIDI instrument catalogue: the one place instrument names are defined.

An *instrument id* is what polyphony uses everywhere (instrument headers, track ids,
generation requests): 0..127 are the GM programs, 128 (``DRUMS``) is the drum kit on MIDI
channel 10. miditok writes drums as ``Program_-1``; :func:`program_to_instrument` maps it.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass

DRUMS = 128
NUM_INSTRUMENTS = 129  # 128 GM programs + drums
GLOBAL_TRACK = 129  # track id of structure tokens (bar, position, tempo, meter, specials)

GM_NAMES: tuple[str, ...] = (
    # Piano
    "Acoustic Grand Piano", "Bright Acoustic Piano", "Electric Grand Piano", "Honky-tonk Piano",
    "Electric Piano 1", "Electric Piano 2", "Harpsichord", "Clavinet",
    # Chromatic Percussion
    "Celesta", "Glockenspiel", "Music Box", "Vibraphone",
    "Marimba", "Xylophone", "Tubular Bells", "Dulcimer",
    # Organ
    "Drawbar Organ", "Percussive Organ", "Rock Organ", "Church Organ",
    "Reed Organ", "Accordion", "Harmonica", "Tango Accordion",
    # Guitar
    "Acoustic Guitar (nylon)", "Acoustic Guitar (steel)", "Electric Guitar (jazz)", "Electric Guitar (clean)",
    "Electric Guitar (muted)", "Overdriven Guitar", "Distortion Guitar", "Guitar Harmonics",
    # Bass
    "Acoustic Bass", "Electric Bass (finger)", "Electric Bass (pick)", "Fretless Bass",
    "Slap Bass 1", "Slap Bass 2", "Synth Bass 1", "Synth Bass 2",
    # Strings
    "Violin", "Viola", "Cello", "Contrabass",
    "Tremolo Strings", "Pizzicato Strings", "Orchestral Harp", "Timpani",
    # Ensemble
    "String Ensemble 1", "String Ensemble 2", "Synth Strings 1", "Synth Strings 2",
    "Choir Aahs", "Voice Oohs", "Synth Voice", "Orchestra Hit",
    # Brass
    "Trumpet", "Trombone", "Tuba", "Muted Trumpet",
    "French Horn", "Brass Section", "Synth Brass 1", "Synth Brass 2",
    # Reed
    "Soprano Sax", "Alto Sax", "Tenor Sax", "Baritone Sax",
    "Oboe", "English Horn", "Bassoon", "Clarinet",
    # Pipe
    "Piccolo", "Flute", "Recorder", "Pan Flute",
    "Blown Bottle", "Shakuhachi", "Whistle", "Ocarina",
    # Synth Lead
    "Lead 1 (square)", "Lead 2 (sawtooth)", "Lead 3 (calliope)", "Lead 4 (chiff)",
    "Lead 5 (charang)", "Lead 6 (voice)", "Lead 7 (fifths)", "Lead 8 (bass + lead)",
    # Synth Pad
    "Pad 1 (new age)", "Pad 2 (warm)", "Pad 3 (polysynth)", "Pad 4 (choir)",
    "Pad 5 (bowed)", "Pad 6 (metallic)", "Pad 7 (halo)", "Pad 8 (sweep)",
    # Synth Effects
    "FX 1 (rain)", "FX 2 (soundtrack)", "FX 3 (crystal)", "FX 4 (atmosphere)",
    "FX 5 (brightness)", "FX 6 (goblins)", "FX 7 (echoes)", "FX 8 (sci-fi)",
    # Ethnic
    "Sitar", "Banjo", "Shamisen", "Koto",
    "Kalimba", "Bagpipe", "Fiddle", "Shanai",
    # Percussive
    "Tinkle Bell", "Agogo", "Steel Drums", "Woodblock",
    "Taiko Drum", "Melodic Tom", "Synth Drum", "Reverse Cymbal",
    # Sound Effects
    "Guitar Fret Noise", "Breath Noise", "Seashore", "Bird Tweet",
    "Telephone Ring", "Helicopter", "Applause", "Gunshot",
)  # fmt: skip

FAMILIES: tuple[str, ...] = (
    "Piano", "Chromatic Percussion", "Organ", "Guitar", "Bass", "Strings", "Ensemble", "Brass",
    "Reed", "Pipe", "Synth Lead", "Synth Pad", "Synth Effects", "Ethnic", "Percussive",
    "Sound Effects",
)  # fmt: skip

# Short names people type, each mapped to the most usual GM choice.
ALIASES: dict[str, int] = {
    "piano": 0, "grand piano": 0, "keys": 4, "electric piano": 4, "rhodes": 4, "harpsichord": 6,
    "celesta": 8, "glockenspiel": 9, "vibes": 11, "vibraphone": 11, "marimba": 12, "xylophone": 13,
    "bells": 14, "organ": 16, "church organ": 19, "accordion": 21, "harmonica": 22,
    "guitar": 25, "acoustic guitar": 25, "nylon guitar": 24, "classical guitar": 24,
    "electric guitar": 27, "clean guitar": 27, "jazz guitar": 26, "overdrive guitar": 29,
    "distortion guitar": 30, "rock guitar": 30,
    "bass": 33, "electric bass": 33, "bass guitar": 33, "acoustic bass": 32, "double bass": 32,
    "upright bass": 32, "fretless bass": 35, "slap bass": 36, "synth bass": 38,
    "violin": 40, "viola": 41, "cello": 42, "contrabass": 43, "harp": 46, "timpani": 47,
    "strings": 48, "string ensemble": 48, "synth strings": 50, "choir": 52, "voice": 53,
    "vocals": 53, "orchestra hit": 55,
    "trumpet": 56, "trombone": 57, "tuba": 58, "horn": 60, "french horn": 60, "brass": 61,
    "synth brass": 62, "sax": 65, "saxophone": 65, "soprano sax": 64, "alto sax": 65,
    "tenor sax": 66, "baritone sax": 67, "oboe": 68, "english horn": 69, "bassoon": 70,
    "clarinet": 71, "piccolo": 72, "flute": 73, "recorder": 74, "pan flute": 75, "whistle": 78,
    "ocarina": 79, "lead": 80, "synth lead": 80, "synth": 80, "square lead": 80, "saw lead": 81,
    "pad": 89, "synth pad": 89, "sitar": 104, "banjo": 105, "koto": 107, "kalimba": 108,
    "bagpipe": 109, "fiddle": 110, "steel drums": 114, "taiko": 116,
    "drums": DRUMS, "drum": DRUMS, "drum kit": DRUMS, "drumkit": DRUMS, "percussion": DRUMS,
    "kit": DRUMS,
}  # fmt: skip

_SEPARATORS = re.compile(r"[,;+\n]")


@dataclass(frozen=True)
class Instrument:
    id: int  # 0..127 GM program, 128 drums

    @property
    def is_drums(self) -> bool:
        return self.id == DRUMS

    @property
    def program(self) -> int:
        """GM program to write in a MIDI file (drums use program 0 on channel 10)."""
        return 0 if self.is_drums else self.id

    @property
    def name(self) -> str:
        return instrument_name(self.id)

    @property
    def family(self) -> str:
        return "Drums" if self.is_drums else FAMILIES[self.id // 8]


class InstrumentError(ValueError):
    """An instrument name or number that is not in the General MIDI catalogue."""


def instrument_name(instrument_id: int) -> str:
    if instrument_id == DRUMS:
        return "Drums"
    if not 0 <= instrument_id < 128:
        raise InstrumentError(f"instrument id {instrument_id} is out of range 0..128 (128 = drums)")
    return GM_NAMES[instrument_id]


def program_to_instrument(program: int, is_drum: bool = False) -> int:
    """A MIDI track's (program, is_drum) or a miditok program (-1 = drums) -> instrument id."""
    return DRUMS if is_drum or program == -1 else int(program)


def instrument_to_program(instrument_id: int) -> int:
    """Instrument id -> miditok program number (drums are -1)."""
    return -1 if instrument_id == DRUMS else int(instrument_id)


def _normalise(name: str) -> str:
    return re.sub(r"\s+", " ", name.strip().lower().replace("_", " ").replace("-", " "))


_LOOKUP: dict[str, int] = {}
for _id, _name in enumerate(GM_NAMES):
    _LOOKUP[_normalise(_name)] = _id
    _LOOKUP[_normalise(re.sub(r"[()]", "", _name))] = _id  # "electric bass finger"
_LOOKUP.update({_normalise(k): v for k, v in ALIASES.items()})
_LOOKUP["drums"] = DRUMS


def valid_names() -> list[str]:
    """Every name the parser accepts: GM names, aliases and family names."""
    return sorted(set(GM_NAMES) | set(ALIASES) | set(FAMILIES) | {"Drums"})


def parse_instrument(text: str) -> int:
    """One instrument: a GM name, an alias, a family name, a program number 0..127, or drums."""
    key = _normalise(text)
    if not key:
        raise InstrumentError("empty instrument name")
    if key.isdigit():
        number = int(key)
        if 0 <= number <= 127:
            return number
        if number == DRUMS:
            return DRUMS
        raise InstrumentError(f"program {number} is out of range: use 0..127, or 'drums'")
    if key in _LOOKUP:
        return _LOOKUP[key]
    families = {_normalise(f): i for i, f in enumerate(FAMILIES)}
    if key in families:
        return families[key] * 8  # a family name means its first (most typical) member
    candidates = sorted(set(_LOOKUP) | set(families))
    close = difflib.get_close_matches(key, candidates, n=5, cutoff=0.5)
    if not close:
        close = [c for c in candidates if key in c or c in key][:5]
    hint = f" Nearest: {', '.join(close)}." if close else ""
    raise InstrumentError(
        f"unknown instrument {text.strip()!r}.{hint} "
        "Use a General MIDI name, an alias such as piano, bass, guitar, strings, sax, choir, "
        "drums, or a program number 0..127 (`python -m polyphony.instruments` lists them all)."
    )


def parse_instruments(spec: str | Iterable[str | int]) -> list[int]:
    """``"piano, bass, drums"`` / ``"0,33,drums"`` / ``"Acoustic Grand Piano;Violin"`` -> ids.

    Order is kept as given; duplicates are kept too (the caller decides what they mean).
    """
    if isinstance(spec, str):
        parts = [p for p in _SEPARATORS.split(spec) if p.strip()]
    else:
        parts = [str(p) for p in spec]
    if not parts:
        raise InstrumentError("no instruments given: e.g. 'piano, bass, drums'")
    return [parse_instrument(p) for p in parts]


def sort_instruments(instrument_ids: Iterable[int]) -> list[int]:
    """Canonical order of an instrument header: programs ascending, drums last, no repeats."""
    return sorted(set(instrument_ids))


def _print_catalogue() -> None:
    for family_index, family in enumerate(FAMILIES):
        print(f"{family}:")
        for program in range(family_index * 8, family_index * 8 + 8):
            aliases = sorted(a for a, v in ALIASES.items() if v == program)
            extra = f"  (also: {', '.join(aliases)})" if aliases else ""
            print(f"  {program:3d}  {GM_NAMES[program]}{extra}")
    drum_aliases = sorted(a for a, v in ALIASES.items() if v == DRUMS)
    print(f"Drums:\n  {DRUMS:3d}  Drums  (also: {', '.join(drum_aliases)})")


if __name__ == "__main__":
    _print_catalogue()
