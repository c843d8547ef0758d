import pytest
from omegaconf import OmegaConf

from fastdino.config import CONFIG_DIR, ConfigError, load_config, save_config


def test_defaults_fill_every_key_and_official_values():
    cfg = load_config(None, ["data.path=x.beton"])
    assert OmegaConf.missing_keys(cfg) == set()
    assert cfg.model.out_dim == 65536 and cfg.optim.lr == 0.0005 and cfg.dino.momentum_teacher == 0.996
    assert cfg.data.augment.blur_p == [1.0, 0.1, 0.5] and cfg.data.augment.solarize_p == [0.0, 0.2, 0.0]


@pytest.mark.parametrize("name", ["vit_small_16.yaml", "vit_base_16.yaml", "demo.yaml"])
def test_experiment_files_load(name):
    cfg = load_config(CONFIG_DIR / name, ["data.path=x.beton"])
    assert cfg.data.path == "x.beton"


def test_experiment_file_changes_only_its_keys():
    base = load_config(None, ["data.path=x"])
    small = load_config(CONFIG_DIR / "vit_small_16.yaml", ["data.path=x"])
    assert small.optim.epochs == 300 and small.dino.teacher_temp == 0.07 and not small.model.norm_last_layer
    assert small.optim.lr == base.optim.lr


def test_override_types_are_converted():
    cfg = load_config(None, ["data.path=x", "optim.lr=0.001", "data.batch_size=32", "model.norm_last_layer=false"])
    assert cfg.optim.lr == 0.001 and cfg.data.batch_size == 32 and cfg.model.norm_last_layer is False


@pytest.mark.parametrize("overrides, key", [
    (["data.path=x", "optim.lrr=0.1"], "optim.lrr"),
    (["data.path=x", "optim.lr=fast"], "optim.lr"),
    (["data.path=x", "data.batch_size=1.5"], "data.batch_size"),
    (["data.path=x", "model.arch=resnet50"], "model.arch"),
    (["data.path=x", "parallel.zero_stage=3"], "parallel.zero_stage"),
    (["data.path=x", "data.global_size=100"], "data.global_size"),
    (["data.path=x", "log_every=0"], "log_every"),
    (["data.path=x", "checkpoint_every=0"], "checkpoint_every"),
    (["data.path=x", "optim.warmup_epochs=-1"], "optim.warmup_epochs"),
    ([], "data.path"),
])
def test_bad_config_is_one_line_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert key in message and "\n" not in message


def test_bad_experiment_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  archh: vit_tiny\n")
    with pytest.raises(ConfigError, match="model.archh"):
        load_config(bad, ["data.path=x"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(CONFIG_DIR / "demo.yaml", ["data.path=x", "seed=3"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)


@pytest.mark.parametrize("key, value", [("optim.warmup_epochs", 3), ("dino.warmup_teacher_temp_epochs", 30)])
def test_warmup_longer_than_the_run_is_an_error(key, value):
    """Neither warm-up would reach its target (the lr's was squeezed, the temperature's cut):
    both are one line naming the key, its value and optim.epochs."""
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.path=x", "optim.epochs=2", "optim.warmup_epochs=0", f"{key}={value}"])
    message = str(err.value)
    assert f"'{key}' is {value}" in message and "optim.epochs is 2" in message and "\n" not in message
    cfg = load_config(None, ["data.path=x", "optim.epochs=2", "optim.warmup_epochs=0", f"{key}=2"])  # reached at the end
    assert OmegaConf.select(cfg, key) == 2
