import pytest

from polyphony.config import ConfigError, load_config, parse_overrides

SIZES = ["tiny", "mini", "small", "base", "large", "ablation"]


@pytest.mark.parametrize("name", SIZES)
def test_shipped_configs_load_and_validate(name):
    cfg = load_config(f"configs/{name}.yaml")
    assert cfg.model.d_model % cfg.model.n_heads == 0
    assert cfg.model.max_seq_len >= cfg.data.max_seq_len


def test_dotted_overrides_are_typed():
    cfg = load_config(
        "configs/tiny.yaml",
        [
            "--train.lr=3e-4",
            "--data.max_seq_len",
            "512",
            "--model.track_embeddings=false",
            "--model.heads.next_type=0.2",
        ],
    )
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.data.max_seq_len == 512
    assert cfg.model.track_embeddings is False
    assert cfg.model.heads == {"next_token": 1.0, "next_instrument": 0.5, "next_type": 0.2}


def test_a_mapping_given_whole_replaces_the_files_mapping():
    cfg = load_config("configs/mini.yaml", ["--model.heads={next_token: 1.0}"])
    assert cfg.model.heads == {"next_token": 1.0}
    # one dotted entry still merges into the file's mapping
    cfg = load_config("configs/mini.yaml", ["--model.heads.next_type=0.5"])
    assert cfg.model.heads == {"next_token": 1.0, "next_instrument": 0.5, "next_type": 0.5}


def test_unknown_key_names_the_key_and_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", ["--train.lrr=1"])
    message = str(err.value)
    assert "train.lrr" in message and "Did you mean lr" in message and "warmup_steps" in message


def test_unknown_section_is_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("dataa: {max_seq_len: 3}\n")
    with pytest.raises(ConfigError, match="dataa"):
        load_config(path)


def test_wrong_type_is_rejected():
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config("configs/tiny.yaml", ["--train.batch_size=many"])


def test_invalid_combinations_are_rejected():
    with pytest.raises(ConfigError, match="n_heads"):
        load_config("configs/tiny.yaml", ["--model.n_heads=5"])
    with pytest.raises(ConfigError, match="keep_last"):
        load_config("configs/tiny.yaml", ["--train.keep_last=1"])
    with pytest.raises(ConfigError, match="tokenization"):
        load_config("configs/tiny.yaml", ["--data.tokenization=octuple"])
    with pytest.raises(ConfigError, match="data.source_held_out.band"):
        load_config("configs/tiny.yaml", ["--data.source_held_out={band: 0.6}"])
    with pytest.raises(ConfigError, match="data.\\*_fraction"):
        load_config(
            "configs/tiny.yaml", ["--data.validation_fraction=0.7", "--data.test_fraction=0.3"]
        )


def test_override_syntax_errors_are_clear():
    with pytest.raises(ConfigError, match="--section.key=value"):
        parse_overrides(["lr=3"])
    with pytest.raises(ConfigError, match="no value"):
        parse_overrides(["--train.lr"])


def test_missing_config_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_bare_no_stays_a_string_for_string_fields():
    cfg = load_config("configs/tiny.yaml", ["--train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no"


def test_cpword_gets_one_head_per_field_when_only_remi_heads_are_configured():
    cfg = load_config("configs/tiny.yaml", ["--data.tokenization=cpword"])
    assert cfg.model.tokenization == "cpword"
    assert set(cfg.model.heads) == {
        "family", "position", "pitch", "velocity", "duration", "program", "tempo", "meter",
        "next_instrument",
    }  # fmt: skip
