import pytest
from omegaconf import OmegaConf

import dataclasses

from fastdino.config import (CHANGEABLE_ON_RESUME, CHOICES, CONFIG_DIR, SETTINGS, AugmentConfig, ConfigError, RunConfig,
                             changeable_on_resume, load_config, save_config)


def test_defaults_fill_every_key_and_official_values():
    cfg = load_config(None, ["data.path=x.beton"])
    assert OmegaConf.missing_keys(cfg) == set()
    assert cfg.model.out_dim == 65536 and cfg.optim.lr == 0.0005 and cfg.dino.momentum_teacher == 0.996
    assert cfg.data.augment.blur_p == [1.0, 0.1, 0.5] and cfg.data.augment.solarize_p == [0.0, 0.2, 0.0]


@pytest.mark.parametrize("name", ["vit_small_16.yaml", "vit_base_16.yaml", "demo.yaml", "laptop.yaml"])
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
    (["data.path=x", "model.out_dim=1"], "model.out_dim"),
    (["data.path=x", "model.img_size=100"], "model.img_size"),
    (["data.path=x", "device=tpu"], "device"),
    (["data.path=x", "parallel.timeout_s=0"], "parallel.timeout_s"),
    (["data.path=x", "data.n_local_crops=-1"], "data.n_local_crops"),
    (["data.path=x", "data.augment.blur_p=[1.0,0.5]"], "data.augment.blur_p"),
    (["data.path=x", "data.augment.solarize_p=[0.0,1.5,0.0]"], "data.augment.solarize_p"),
    (["data.path=x", "data.augment.flip_p=-0.1"], "data.augment.flip_p"),
    (["data.path=x", "data.augment.mean=[0.5]"], "data.augment.mean"),
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


@pytest.mark.parametrize("override, text", [
    ("model.arch=resnet50", "config key 'model.arch' is 'resnet50'; expected one of vit_tiny, vit_small, vit_base"),
    ("data.batch_size=0", "config key 'data.batch_size' must be positive, got 0"),
    ("max_steps=-1", "config key 'max_steps' must be >= 0, got -1"),
    ("model.out_dim=1", "config key 'model.out_dim' must be >= 2, got 1"),
    ("data.augment.flip_p=2.0", "config key 'data.augment.flip_p' must be between 0 and 1, got 2.0"),
    ("data.augment.blur_p=[1.0,0.1,-0.5]", "config key 'data.augment.blur_p' must hold values between 0 and 1"),
    ("data.augment.blur_p=[1.0,0.1]", "config key 'data.augment.blur_p' needs 3 values (Gaussian blur probability: "
                                      "global crop 1, global crop 2, local crops), got 2"),
    ("data.local_size=100", "config key 'data.local_size' must be a multiple of model.patch_size=16"),
    ("optim.lr=-1", "config key 'optim.lr' must be >= 0, got -1.0"),
    ("optim.weight_decay=-1", "config key 'optim.weight_decay' must be >= 0, got -1.0"),
    ("optim.clip_grad=-1", "config key 'optim.clip_grad' must be >= 0, got -1.0"),
    ("dino.momentum_teacher=1.5", "config key 'dino.momentum_teacher' must be between 0 and 1, got 1.5"),
    ("dino.teacher_temp=0", "config key 'dino.teacher_temp' must be positive, got 0.0"),
    ("dino.student_temp=0", "config key 'dino.student_temp' must be positive, got 0.0"),
    ("model.depth=0", "config key 'model.depth' must be positive, got 0"),
    ("model.drop_path_rate=1.5", "config key 'model.drop_path_rate' must be between 0 and 0.99, got 1.5"),
    ("optim.warmup_epochs=101", "config key 'optim.warmup_epochs' is 101.0 but optim.epochs is 100: the warm-up "
                                "would never reach optim.lr=0.0005; shorten it or raise optim.epochs"),
])
def test_field_checks_give_their_one_line_error(override, text):
    """Validation is generic over each field's metadata (choices, positive, bounds, length, multiple_of,
    warmup_of): one line, naming the key, its rule and the value."""
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.path=x", override])
    assert str(err.value).startswith(text)


def _flat_keys(node, prefix=""):
    keys = {}
    for key, value in node.items():
        keys.update(_flat_keys(value, f"{prefix}{key}.") if OmegaConf.is_dict(value) else {f"{prefix}{key}": 1})
    return keys


def test_one_home_per_key():
    """Every key is one dataclass field: CHOICES and CHANGEABLE_ON_RESUME are read off the fields, and
    the sections are plain dataclasses with the official defaults (multicrop reads AugmentConfig's)."""
    cfg = load_config(None, ["data.path=x"])
    assert set(SETTINGS) == set(_flat_keys(cfg))  # every key of a loaded config, and no other
    assert CHOICES["model.arch"] == ("vit_tiny", "vit_small", "vit_base")
    assert CHOICES["parallel.zero_stage"] == (0, 1, 2)
    assert all(key in SETTINGS for key in CHOICES)
    assert {"eval", "monitor", "logging", "data.path", "max_steps"} <= set(CHANGEABLE_ON_RESUME)
    assert changeable_on_resume("eval.knn_k") and not changeable_on_resume("optim.lr")
    assert not changeable_on_resume("data.augment.flip_p") and not changeable_on_resume("model.arch")
    augment = AugmentConfig()
    assert augment.blur_p == [1.0, 0.1, 0.5] and augment.flip_p == 0.5 and augment.ratio == [0.75, 1.3333333]
    assert AugmentConfig().blur_p is not augment.blur_p  # list defaults are not shared
    assert dataclasses.asdict(augment) == OmegaConf.to_container(cfg.data.augment)
    assert RunConfig().data.path == "???" and RunConfig().optim.lr == 0.0005
