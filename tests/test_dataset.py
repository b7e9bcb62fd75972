"""WindowDataset: headers, labels, bar alignment, determinism, augmentation, sampling, memory."""

from __future__ import annotations

import json
import pickle
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from symusic import Note, Score, Tempo, TimeSignature, Track

from polyphony.config import CPWORD_FIELDS, DataConfig
from polyphony.data.dataset import (
    SPLITS,
    DatasetError,
    WindowDataset,
    load_manifest,
    tokenizer_of,
)
from polyphony.data.prepare import prepare_dataset
from polyphony.instruments import DRUMS, GLOBAL_TRACK
from polyphony.tokenizer import PolyTokenizer, density_bin

KINDS = ("remi", "cpword")
PITCH = CPWORD_FIELDS.index("pitch")
VELOCITY = CPWORD_FIELDS.index("velocity")
PROGRAM = CPWORD_FIELDS.index("program")


def band_score(seed: int, n_bars: int = 8, programs=(0, 33), drums=True, pitches=(40, 90)) -> Score:
    """A 4/4 piece: one quarter-note line per program, eighth-note drums."""
    rng = np.random.default_rng(seed)
    score = Score(480)
    score.tempos.append(Tempo(0, 120.0))
    score.time_signatures.append(TimeSignature(0, 4, 4))
    for program in programs:
        track = Track(program=int(program))
        for beat in range(n_bars * 4):
            pitch = int(rng.integers(pitches[0], pitches[1] + 1))
            track.notes.append(Note(beat * 480, 480, pitch, int(rng.integers(20, 120))))
        score.tracks.append(track)
    if drums:
        track = Track(program=0, is_drum=True)
        for eighth in range(n_bars * 8):
            track.notes.append(Note(eighth * 240, 120, int(rng.choice([36, 38, 42])), 90))
        score.tracks.append(track)
    return score


def write_dataset(
    root: Path, kind: str, sources: dict[str, list[Score]], split: str, **data
) -> Path:
    """Write the scores as MIDI files (``<source>/NN.mid``) and prepare them, all into ``split``
    (``data``: other DataConfig fields)."""
    midi_dir = root.parent / f"{root.name}_midi"
    for source, scores in sources.items():
        (midi_dir / source).mkdir(parents=True, exist_ok=True)
        for number, score in enumerate(scores):
            score.dump_midi(midi_dir / source / f"{number:02d}.mid")
    fractions = {"train": (0.0, 0.0), "validation": (1.0, 0.0), "test": (0.0, 1.0)}[split]
    config = DataConfig(
        tokenization=kind, validation_fraction=fractions[0], test_fraction=fractions[1], **data
    )
    summary = prepare_dataset(midi_dir, root, config, workers=0, progress=False)
    assert summary.pieces[split] == sum(len(scores) for scores in sources.values())
    return root


@pytest.fixture(params=KINDS)
def prepared(request) -> Path:
    """The real fixture corpus, prepared once per session by conftest (all three splits)."""
    return request.getfixturevalue(f"prepared_{request.param}")


@pytest.fixture(scope="module", params=KINDS)
def band_dataset(request, tmp_path_factory) -> Path:
    """Generated band pieces that certainly have drums, all in train (augmentation tests)."""
    scores = [band_score(seed, n_bars=6 + seed) for seed in range(6)]
    scores.append(band_score(99, n_bars=8, programs=(0, 40, 73)))
    root = tmp_path_factory.mktemp(f"band_{request.param}") / "data"
    return write_dataset(root, request.param, {"": scores}, "train")


def is_bar(tokenizer: PolyTokenizer, row: np.ndarray) -> bool:
    if tokenizer.kind == "remi":
        return tokenizer.token_name(int(row)) == "Bar_None"
    return int(row[0]) == tokenizer.family_metric_id and tokenizer.token_name(
        int(row[1]), 1
    ).startswith("Bar")


def pitched_mask(tokenizer: PolyTokenizer, ids: np.ndarray) -> np.ndarray:
    """Rows carrying the pitch of a pitched (non-drum) note."""
    if tokenizer.kind == "remi":
        return np.array([tokenizer.token_name(int(i)).startswith("Pitch_") for i in ids])
    drums = tokenizer.program_token(DRUMS)
    notes = ids[:, 0] == tokenizer.family_note_id
    return notes & (ids[:, PROGRAM] != drums)


def drum_mask(tokenizer: PolyTokenizer, ids: np.ndarray) -> np.ndarray:
    """Rows carrying the pitch (= instrument) of a drum note."""
    if tokenizer.kind == "remi":
        return np.array([tokenizer.token_name(int(i)).startswith("PitchDrum_") for i in ids])
    notes = ids[:, 0] == tokenizer.family_note_id
    return notes & (ids[:, PROGRAM] == tokenizer.program_token(DRUMS))


def pitch_values(tokenizer: PolyTokenizer, ids: np.ndarray, drums: bool = False) -> np.ndarray:
    """Pitch numbers of Pitch_x rows (PitchDrum_x rows with ``drums``)."""
    column = ids if tokenizer.kind == "remi" else ids[:, PITCH]
    field = 0 if tokenizer.kind == "remi" else PITCH
    prefix = "PitchDrum_" if drums else "Pitch_"
    names = [tokenizer.token_name(int(i), field) for i in column]
    assert all(name.startswith(prefix) for name in names)
    return np.array([int(name[len(prefix) :]) for name in names], dtype=np.int64)


# ----------------------------------------------------------------- header, labels, alignment
def window_header_length(tokenizer: PolyTokenizer, ids: np.ndarray) -> int:
    first = ids if tokenizer.kind == "remi" else ids[:, 0]
    return int(np.flatnonzero(first == tokenizer.sep_id)[0]) + 1


def counted_densities(tokenizer: PolyTokenizer, body: np.ndarray, ends_piece: bool) -> dict:
    """Notes per bar by instrument, counted token by token from the names (independent of
    PolyTokenizer.notes_per_bar): notes between the first and the last bar line (to the end
    when the window ends the piece), over the bars between them; present = plays anywhere."""
    names, programs = [], []
    program = None
    for row in body:
        if tokenizer.kind == "remi":
            name = tokenizer.token_name(int(row))
            if name.startswith("Program_"):
                program = int(name.split("_")[1])
            names.append(name.split("_")[0])
            programs.append(program)
        else:
            family = tokenizer.token_name(int(row[0]), 0)
            position = tokenizer.token_name(int(row[1]), 1)
            note = family == "Family_Note"
            names.append("Pitch" if note else "Bar" if position == "Bar_None" else "Other")
            programs.append(
                int(tokenizer.token_name(int(row[PROGRAM]), PROGRAM).split("_")[1])
                if note
                else None
            )
    bars = [i for i, name in enumerate(names) if name == "Bar"]
    notes = [i for i, name in enumerate(names) if name in ("Pitch", "PitchDrum")]
    instrument = lambda i: DRUMS if programs[i] == -1 else programs[i]  # noqa: E731
    present = {instrument(i) for i in notes}
    if not bars:
        low, high, n_bars = 0, len(body), 1
    elif ends_piece:
        low, high, n_bars = bars[0], len(body), len(bars)
    elif len(bars) == 1:
        low, high, n_bars = bars[0], len(body), 1
    else:
        low, high, n_bars = bars[0], bars[-1], len(bars) - 1
    counts = Counter(instrument(i) for i in notes if low <= i < high)
    return {i: counts[i] / n_bars for i in present}


def test_every_window_header_lists_what_plays_in_it_with_its_density(prepared):
    """Window-true headers: the instruments that play in the window, each with the density bin
    of an independent note count over the window's whole bars."""
    ds = WindowDataset(prepared, "train", max_seq_len=48, seed=3, windows_per_epoch=200)
    tokenizer = ds.tokenizer
    seen_pieces, mid_piece, fewer = set(), 0, 0
    for index in range(len(ds)):
        window = ds.window(index)
        item = ds[index]
        length = window_header_length(tokenizer, window.ids)
        header, body = window.ids[:length], window.ids[length:]
        piece_end = ds.piece_lengths[window.piece] - window.start
        ends_piece = len(body) == piece_end
        expected = counted_densities(tokenizer, body, ends_piece)
        announced = tokenizer.header_densities(header)
        assert announced == {i: density_bin(v) for i, v in expected.items()}, index
        assert set(announced) <= set(ds.instruments[window.piece])
        np.testing.assert_array_equal(item["input_ids"][:length].numpy(), header)
        header_tracks = item["track_ids"][:length].numpy()
        assert set(header_tracks[1:-1]) == set(announced)
        assert header_tracks[0] == header_tracks[-1] == GLOBAL_TRACK
        seen_pieces.add(window.piece)
        mid_piece += window.start > ds.header_lengths[window.piece]
        fewer += len(announced) < len(ds.instruments[window.piece])
    assert len(seen_pieces) >= min(ds.n_pieces, 5) and mid_piece > len(ds) // 2
    assert fewer > 0  # some windows leave out an instrument of their piece


def check_labels(ds: WindowDataset) -> int:
    """Assert labels are the next rows of every window; return how many windows were padded."""
    pad, length = ds.tokenizer.pad_id, ds.max_seq_len
    padded = 0
    for index in range(len(ds)):
        window, item = ds.window(index), ds[index]
        inputs, labels = item["input_ids"].numpy(), item["labels"].numpy()
        n = len(window.ids)  # rows before padding, up to T + 1
        assert inputs.shape[0] == labels.shape[0] == length
        np.testing.assert_array_equal(inputs[: min(n, length)], window.ids[:length])
        # Labels are the window shifted by one; -100 only where nothing is to be predicted.
        known = labels[: n - 1] != -100
        np.testing.assert_array_equal(labels[: n - 1][known], window.ids[1:][known])
        label_tracks = item["label_track_ids"].numpy()
        np.testing.assert_array_equal(label_tracks[: n - 1], window.track_ids[1:])
        if ds.tokenizer.kind == "remi":
            assert known.all()
        else:  # a row is never ignored whole, only its Ignore/special fields
            assert known[:, 0].all()
        if n <= length:
            padded += 1
            assert (inputs[n:] == pad).all() and (labels[n - 1 :] == -100).all()
            assert (label_tracks[n - 1 :] == -100).all()
            assert (item["track_ids"][n:].numpy() == GLOBAL_TRACK).all()
    return padded


def test_labels_are_the_next_tokens(prepared):
    check_labels(WindowDataset(prepared, "train", max_seq_len=64, seed=0, windows_per_epoch=150))
    evaluation = WindowDataset(prepared, "validation", max_seq_len=256)
    capacity = 257 - evaluation.header_lengths
    ends_mid_window = (evaluation.piece_lengths - evaluation.header_lengths) % capacity != 0
    # Padded: each piece's last chunk, and any chunk whose window-true header is shorter than
    # the piece's (an instrument of the piece is silent there).
    expected, last_piece = 0, None
    for index in reversed(range(len(evaluation))):
        window = evaluation.window(index)
        last_chunk = window.piece != last_piece
        last_piece = window.piece
        announced = evaluation.tokenizer.header_densities(window.ids)
        short_header = len(announced) < len(evaluation.instruments[window.piece])
        expected += (last_chunk and ends_mid_window[window.piece]) or short_header
    assert check_labels(evaluation) == expected


def test_bar_aligned_windows_start_at_a_bar(prepared):
    aligned = WindowDataset(prepared, "train", max_seq_len=64, seed=5, windows_per_epoch=200)
    free = WindowDataset(
        prepared, "train", max_seq_len=64, seed=5, bar_aligned=False, windows_per_epoch=200
    )
    tokenizer = aligned.tokenizer
    off_bar = 0
    for index in range(len(aligned)):
        window = aligned.window(index)
        assert is_bar(tokenizer, window.ids[window_header_length(tokenizer, window.ids)])
        unaligned = free.window(index)
        off_bar += not is_bar(
            tokenizer, unaligned.ids[window_header_length(tokenizer, unaligned.ids)]
        )
    assert off_bar > len(free) // 2  # alignment is what made the difference


# ----------------------------------------------------------------- determinism
def items_equal(a: dict, b: dict) -> bool:
    return all(bool((a[key] == b[key]).all()) for key in a)


def test_item_is_a_pure_function_of_seed_epoch_and_index(prepared):
    first = WindowDataset(prepared, "train", max_seq_len=64, seed=11)
    second = WindowDataset(prepared, "train", max_seq_len=64, seed=11)
    indices = [len(first) - 1, 0, 5, 2, 5]  # out of order, repeated: no hidden state
    for index in indices:
        assert items_equal(first[index], second[index])
        assert items_equal(first[index], first[index])
    for ds in (first, second):
        ds.set_epoch(1)
    assert items_equal(first[2], second[2])
    epoch_zero = WindowDataset(prepared, "train", max_seq_len=64, seed=11)
    differs_by_epoch = sum(not items_equal(first[i], epoch_zero[i]) for i in indices)
    other_seed = WindowDataset(prepared, "train", max_seq_len=64, seed=12)
    other_seed.set_epoch(1)
    differs_by_seed = sum(not items_equal(first[i], other_seed[i]) for i in indices)
    assert differs_by_epoch >= 4 and differs_by_seed >= 4


def test_dataset_survives_pickling_for_dataloader_workers(prepared):
    ds = WindowDataset(prepared, "train", max_seq_len=64, seed=2)
    ds.set_epoch(3)
    expected = ds[7]
    clone = pickle.loads(pickle.dumps(ds))
    assert items_equal(clone[7], expected)
    # The memmaps are reopened in the worker, not copied into the pickle.
    blob = pickle.dumps(ds)
    assert ds.shards[0].tobytes() not in blob and ds.shards[1].tobytes() not in blob
    assert isinstance(clone.shards[0], np.memmap)


# ----------------------------------------------------------------- augmentation
def compare_augmented(root: Path, n_windows: int, **kwargs):
    """(tokenizer, [(window, augmented, plain)]): same windows with and without augmentation."""
    augmented = WindowDataset(root, "train", augment=True, windows_per_epoch=n_windows, **kwargs)
    plain = WindowDataset(root, "train", augment=False, windows_per_epoch=n_windows, **kwargs)
    pairs = []
    for index in range(n_windows):
        window = augmented.window(index)
        reference = plain.window(index)
        assert (window.piece, window.start) == (reference.piece, reference.start)
        pairs.append((window, window.ids, reference.ids))
    return augmented.tokenizer, pairs


def test_augmentation_never_moves_drums_and_is_reproducible(band_dataset):
    tokenizer, pairs = compare_augmented(band_dataset, 60, max_seq_len=96, seed=4)
    drum_rows = transposed = 0
    for _, augmented, plain in pairs:
        drums = drum_mask(tokenizer, plain)
        assert (drum_mask(tokenizer, augmented) == drums).all()
        pitch_of = (lambda ids: ids) if tokenizer.kind == "remi" else (lambda ids: ids[:, PITCH])
        np.testing.assert_array_equal(pitch_of(augmented)[drums], pitch_of(plain)[drums])
        drum_rows += int(drums.sum())
        transposed += not np.array_equal(augmented, plain)
    assert drum_rows > 100 and transposed > 30
    _, again = compare_augmented(band_dataset, 60, max_seq_len=96, seed=4)
    for (_, first, _), (_, second, _) in zip(pairs, again, strict=True):
        np.testing.assert_array_equal(first, second)


def test_transposition_moves_every_pitched_note_by_one_shift_within_range(
    prepared, tmp_path_factory
):
    # Generated pitches reach 1 and 126: only shifts in [-1, 1] keep them inside 0..127.
    kind = load_manifest(prepared)["tokenization"]
    edge = tmp_path_factory.mktemp(f"edge_{kind}") / "data"
    scores = [band_score(seed, n_bars=4, pitches=(1, 126)) for seed in range(2)]
    scores.append(band_score(7, n_bars=4, pitches=(50, 70)))
    write_dataset(edge, kind, {"": scores}, "train")
    for root in (edge, prepared):
        tokenizer, pairs = compare_augmented(
            root, 80, max_seq_len=512, seed=0, transpose_semitones=5, velocity_shift=8
        )
        shifts = Counter()
        for window, augmented, plain in pairs:
            pitched = pitched_mask(tokenizer, plain)
            before = pitch_values(tokenizer, plain[pitched])
            after = pitch_values(tokenizer, augmented[pitched])
            assert len(set((after - before).tolist())) <= 1
            assert (after - before == window.transpose).all()
            assert after.min() >= 0 and after.max() <= 127
            assert max(-5, -before.min()) <= window.transpose <= min(5, 127 - before.max())
            shifts[window.transpose] += 1
            # Velocities: every note moves by the same number of 4-wide bins (clamped).
            field = 0 if kind == "remi" else VELOCITY
            column = plain if kind == "remi" else plain[:, VELOCITY]
            moved = augmented if kind == "remi" else augmented[:, VELOCITY]
            names = [tokenizer.token_name(int(i), field) for i in column]
            has_velocity = np.array([n.startswith("Velocity_") for n in names])
            if kind == "cpword":
                has_velocity &= plain[:, 0] == tokenizer.family_note_id
            old = np.array(
                [int(tokenizer.token_name(int(i), field)[9:]) for i in column[has_velocity]]
            )
            new = np.array(
                [int(tokenizer.token_name(int(i), field)[9:]) for i in moved[has_velocity]]
            )
            expected = np.clip(old + 4 * window.velocity_bins, 3, 127)
            np.testing.assert_array_equal(new, expected)
            assert abs(window.velocity_bins) <= 2
        assert len(shifts) >= 3  # the shift really varies


# ----------------------------------------------------------------- sampling
def test_sources_are_drawn_in_the_configured_proportions(tmp_path_factory):
    sources = {
        "band": [band_score(seed, n_bars=4) for seed in range(3)],
        "choir": [
            band_score(10 + seed, n_bars=4, programs=(52,), drums=False) for seed in range(2)
        ],
        "solo": [band_score(20, n_bars=4, programs=(73,), drums=False)],
        "ignored": [band_score(30, n_bars=4, programs=(24,), drums=False)],
    }
    root = write_dataset(tmp_path_factory.mktemp("sources") / "data", "remi", sources, "train")
    weights = {"band": 1.0, "choir": 3.0, "ignored": 0.0}  # solo missing -> 1.0
    n_draws = 4000
    ds = WindowDataset(root, "train", 64, seed=0, source_weights=weights, windows_per_epoch=n_draws)
    assert ds.source_counts() == {"band": 3, "choir": 2, "ignored": 1, "solo": 1}
    drawn = Counter(ds.source_of(ds.window(i).piece) for i in range(n_draws))
    expected = {"band": 0.2, "choir": 0.6, "solo": 0.2, "ignored": 0.0}
    # 4000 draws: one standard deviation of a 0.2 share is 0.0063; allow ~4 of them.
    for source, share in expected.items():
        assert abs(drawn[source] / n_draws - share) < 0.025, (source, drawn)
    # The density statistics weigh pieces the same way: each source's share split evenly.
    piece_weights = ds.piece_weights()
    assert piece_weights.sum() == pytest.approx(1.0)
    for source, share in expected.items():
        pieces = [p for p in range(ds.n_pieces) if ds.source_of(p) == source]
        assert piece_weights[pieces] == pytest.approx([share / len(pieces)] * len(pieces))


def test_pieces_are_drawn_in_proportion_to_their_length(tmp_path_factory):
    scores = [band_score(0, n_bars=2), band_score(1, n_bars=6), band_score(2, n_bars=12)]
    root = write_dataset(tmp_path_factory.mktemp("lengths") / "data", "remi", {"": scores}, "train")
    n_draws = 3000
    ds = WindowDataset(root, "train", 64, seed=1, windows_per_epoch=n_draws)
    lengths = ds.piece_lengths / ds.piece_lengths.sum()
    counts = np.bincount([ds.window(i).piece for i in range(n_draws)], minlength=3)
    np.testing.assert_allclose(counts / n_draws, lengths, atol=0.03)


# ----------------------------------------------------------------- memory and evaluation
def test_shards_are_memory_mapped_not_loaded(prepared):
    ds = WindowDataset(prepared, "train", max_seq_len=64)
    ds[0]
    ids, track_ids = ds.shards
    assert isinstance(ids, np.memmap) and isinstance(track_ids, np.memmap)
    # Default epoch size: the split's tokens once over, in windows.
    assert len(ds) == max(int(ds.piece_lengths.sum()) // 64, ds.n_pieces)


def test_validation_windows_cover_each_piece_exactly_once(prepared):
    ds = WindowDataset(prepared, "validation", max_seq_len=128, seed=0)
    assert not ds.augment
    bodies: dict[int, list[np.ndarray]] = {}
    order = []
    for index in range(len(ds)):
        window = ds.window(index)
        header_length = window_header_length(ds.tokenizer, window.ids)
        bodies.setdefault(window.piece, []).append(window.ids[header_length:])
        order.append(window.piece)
    assert order == sorted(order)  # piece by piece, in shard order
    assert set(bodies) == set(range(ds.n_pieces))
    for piece, chunks in bodies.items():
        stored = ds.piece_ids(piece)
        np.testing.assert_array_equal(np.concatenate(chunks), stored[ds.header_lengths[piece] :])
    # Fixed across epochs and seeds.
    other = WindowDataset(prepared, "validation", max_seq_len=128, seed=9)
    other.set_epoch(4)
    assert all(items_equal(ds[i], other[i]) for i in range(len(ds)))


def complete_bars(tokenizer: PolyTokenizer, body: np.ndarray) -> np.ndarray:
    """The whole bars of a window body: evaluation chunks start, and any window may end, in
    the middle of a note."""
    bars = [i for i, row in enumerate(body) if is_bar(tokenizer, row)]
    return body[bars[0] : bars[-1]] if len(bars) > 1 else body[:0]


def test_a_drum_track_survives_prepare_dataset_and_decode(prepared):
    checked = 0
    for split in SPLITS:
        windows = 40 if split == "train" else None
        ds = WindowDataset(prepared, split, max_seq_len=512, seed=1, windows_per_epoch=windows)
        tokenizer = ds.tokenizer
        for index in range(len(ds)):
            window = ds.window(index)
            if DRUMS not in ds.instruments[window.piece]:
                continue
            header_length = window_header_length(tokenizer, window.ids)
            body = complete_bars(tokenizer, window.ids[header_length:])
            drum_rows = drum_mask(tokenizer, body)
            if not drum_rows.any():
                continue
            score = tokenizer.decode(np.concatenate([window.ids[:header_length], body]))
            drums = [track for track in score.tracks if track.is_drum]
            assert len(drums) == 1, (split, index)
            expected = pitch_values(tokenizer, body[drum_rows], drums=True)
            assert sorted(n.pitch for n in drums[0].notes) == sorted(expected.tolist())
            checked += 1
    assert checked >= 3, "the fixtures should give several windows with drums"


# ----------------------------------------------------------------- ablation switches
@pytest.mark.parametrize("kind", KINDS)
def test_the_ablation_switches_change_only_what_they_name(kind, tmp_path):
    """note_order=file keeps the file's track order at an onset; track_densities=false
    announces the same instruments, each with bin 0."""
    score = band_score(0, programs=(33, 0))  # the bass track first in the file
    canonical = write_dataset(tmp_path / "canonical", kind, {"band": [score]}, "train")
    file_order = write_dataset(
        tmp_path / "file", kind, {"band": [score]}, "train", note_order="file"
    )
    first, second = (
        WindowDataset(d, "train", 512, seed=0, augment=False) for d in (canonical, file_order)
    )
    assert load_manifest(file_order)["config"]["note_order"] == "file"
    a, b = first.piece_ids(0), second.piece_ids(0)
    assert a.shape == b.shape and not np.array_equal(a, b)
    tracks = first.tokenizer.track_ids(a)
    notes = tracks[first.tokenizer.note_mask(a)]
    # At the first onset the piano (0) comes before the bass (33) only in canonical order.
    assert list(notes[:2]) == [0, 33]
    assert list(second.tokenizer.track_ids(b)[second.tokenizer.note_mask(b)][:2]) == [33, 0]
    flat = WindowDataset(canonical, "train", 512, seed=0, augment=False, track_densities=False)
    window, flat_window = first.window(0), flat.window(0)
    announced = first.tokenizer.header_densities(window.ids)
    assert flat.tokenizer.header_densities(flat_window.ids) == dict.fromkeys(announced, 0)
    assert any(announced.values())


# ----------------------------------------------------------------- errors
def test_a_dataset_with_the_old_header_is_refused_naming_prepare(prepared, tmp_path):
    """Shards written before canonical order and per-track densities (no header_format, i.e.
    format 1) would train on another token order: refused in one line."""
    old = tmp_path / "old"
    shutil.copytree(prepared, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["header_format"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError) as caught:
        WindowDataset(old, "train", 64)
    message = str(caught.value)
    assert "\n" not in message and str(old) in message
    assert "header format 1" in message and "python -m polyphony.data.prepare" in message


def test_missing_or_mismatched_dataset_errors_name_the_dir_and_fix(prepared, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match="nowhere.*prepare"):
        WindowDataset(missing, "train", 64)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="empty.*manifest.json"):
        load_manifest(empty)
    kind = load_manifest(prepared)["tokenization"]
    other = "cpword" if kind == "remi" else "remi"
    cfg = DataConfig(dataset_dir=str(prepared), tokenization=other)
    with pytest.raises(DatasetError, match=f"{prepared}.*tokenization.*{other}"):
        WindowDataset.from_config(cfg, "train", seed=0)
    cfg = DataConfig(dataset_dir=str(prepared), tokenization=kind, max_seq_len=32)
    ds = WindowDataset.from_config(cfg, "train", seed=0)
    assert ds.augment and ds[0]["input_ids"].shape[0] == 32
    assert not WindowDataset.from_config(cfg, "validation", seed=0).augment
    # A tokenizer.json that is not the one the shards were written with.
    tampered = tmp_path / "tampered"
    shutil.copytree(prepared, tampered, ignore=shutil.ignore_patterns("cache"))
    manifest = json.loads((tampered / "manifest.json").read_text())
    manifest["tokenizer_hash"] = "0" * 16
    (tampered / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="tampered.*does not match"):
        tokenizer_of(tampered)
    (tampered / "train" / "offsets.npy").unlink()
    manifest["tokenizer_hash"] = ds.tokenizer.hash
    (tampered / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="offsets.npy"):
        WindowDataset(tampered, "train", 64)
