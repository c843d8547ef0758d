"""configs/default.yaml is generated from the dataclasses of fastdino/config.py, each key's one home:
it must be exactly what the generator writes now, so a default or comment changed in the code without
regenerating (or an edit of the file by hand) fails here. Regenerate with
    python -m fastdino.config --write-default configs/default.yaml
"""
import dataclasses
import re

import pytest
from omegaconf import OmegaConf

from fastdino import config
from fastdino.config import DEFAULT_CONFIG, SETTINGS, RunConfig, default_yaml, main


def test_checked_in_default_yaml_is_what_the_generator_writes():
    assert DEFAULT_CONFIG.read_text() == default_yaml(), (
        f"{DEFAULT_CONFIG} is out of date: run python -m fastdino.config --write-default configs/default.yaml")


def test_generated_yaml_reads_back_as_the_dataclass_defaults():
    from_yaml = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.create(default_yaml()))
    assert OmegaConf.to_yaml(from_yaml) == OmegaConf.to_yaml(OmegaConf.structured(RunConfig))
    raw = OmegaConf.to_container(OmegaConf.create(default_yaml()))  # types too, before any schema converts them
    defaults = OmegaConf.to_container(OmegaConf.structured(RunConfig))
    flat = config._flatten(raw)
    for key, value in config._flatten(defaults).items():
        assert flat[key] == value and type(flat[key]) is type(value), key


def test_every_key_has_a_comment_naming_its_choices():
    for key, f in SETTINGS.items():
        help = f.metadata["help"]
        assert help and "\n" not in help, key
        for choice in f.metadata["choices"]:
            assert re.search(rf"(?<![\w-]){re.escape(str(choice))}(?![\w-])", help), f"{key}: {choice} undocumented"
    for f in dataclasses.fields(RunConfig):
        if "section" in f.metadata:
            assert f.metadata["section"].__doc__.strip(), f.name


def test_check_option(tmp_path, capsys):
    target = tmp_path / "default.yaml"
    assert main(["--write-default", str(target)]) == 0 and main(["--check", str(target)]) == 0
    target.write_text(target.read_text().replace("lr: 0.0005", "lr: 0.001"))
    assert main(["--check", str(target)]) == 1
    assert "--write-default" in capsys.readouterr().err


@pytest.mark.parametrize("value, text", [(1e-6, "1.0e-6"), (1.5e20, "1.5e+20"), (600.0, "600.0"), ("", '""'),
                                         ("yes", '"yes"'), ("a: b", '"a: b"'), ("runs/x", "runs/x"), (True, "true")])
def test_yaml_scalars_read_back_as_themselves(value, text):
    assert config._yaml_scalar(value) == text
    assert OmegaConf.create(f"k: {text}").k == value
