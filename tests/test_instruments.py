import pytest
from hypothesis import given
from hypothesis import strategies as st

from polyphony.instruments import (
    DRUMS,
    FAMILIES,
    GM_NAMES,
    Instrument,
    InstrumentError,
    parse_instrument,
    parse_instruments,
    program_to_instrument,
    sort_instruments,
)


def test_catalogue_is_complete_general_midi():
    assert len(GM_NAMES) == 128 and len(set(GM_NAMES)) == 128
    assert len(FAMILIES) == 16
    assert GM_NAMES[0] == "Acoustic Grand Piano" and GM_NAMES[33] == "Electric Bass (finger)"
    assert Instrument(40).family == "Strings" and Instrument(DRUMS).family == "Drums"


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("piano, bass, drums", [0, 33, DRUMS]),
        ("0,33,drums", [0, 33, DRUMS]),
        ("Acoustic Grand Piano;Violin", [0, 40]),
        ("strings + sax + choir", [48, 65, 52]),
        ("electric bass (finger), Electric Bass finger", [33, 33]),
        ("  GUITAR ,  Drum Kit ", [25, DRUMS]),
        ("Brass", [61]),
        ("Synth Lead", [80]),
        ("128", [DRUMS]),
    ],
)
def test_parse_instrument_lists_in_every_documented_form(spec, expected):
    assert parse_instruments(spec) == expected


@given(st.integers(0, 127))
def test_every_gm_name_and_number_parses_to_its_program(program):
    assert parse_instrument(GM_NAMES[program]) == program
    assert parse_instrument(str(program)) == program
    assert parse_instrument(GM_NAMES[program].upper()) == program


def test_bad_name_lists_nearest_valid_names():
    with pytest.raises(InstrumentError) as err:
        parse_instruments("piano, basss")
    assert "'basss'" in str(err.value) and "bass" in str(err.value).split("Nearest:")[1]


@pytest.mark.parametrize("bad", ["", " , ", "200", "-1", "kazoo-trombone-9000"])
def test_invalid_specs_raise_instrument_error(bad):
    with pytest.raises(InstrumentError):
        parse_instruments(bad)


def test_drums_map_from_miditok_and_from_midi_tracks():
    assert program_to_instrument(-1) == DRUMS
    assert program_to_instrument(25, is_drum=True) == DRUMS
    assert program_to_instrument(25) == 25
    assert sort_instruments([DRUMS, 33, 0, 33]) == [0, 33, DRUMS]


def test_catalogue_cli_lists_all_programs():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "polyphony.instruments"], capture_output=True, text=True, check=True
    ).stdout
    assert all(name in out for name in GM_NAMES) and "Drums" in out
