"""Every packaged preset parses and validates (its configs are built, ``__post_init__`` checks included), and
``--config`` takes a preset by name or a path."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from jsonargparse import ArgumentParser

from vqakit import cli
from vqakit.configs import list_presets, preset_path, resolve_config

PRESETS = list_presets()


def test_presets_are_listed():
    assert {"easy-vqa", "easy-vqa-gru", "easy-vqa-llm-stage1", "shapes-rel", "vqa-v2"} <= set(PRESETS)
    assert cli.list_models() == PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_preset_builds_its_configs(name):
    """``vqakit train --config NAME``: the parser the CLI uses reads the file and builds every section's config."""
    sections = yaml.safe_load(preset_path(name).read_text())
    parser = ArgumentParser(exit_on_error=False)
    parser.add_function_arguments(cli.train, as_group=False)
    cfg = parser.instantiate_classes(parser.parse_path(str(preset_path(name))))
    for section in sections:
        built = cfg[section]
        assert dataclasses.is_dataclass(built), (section, type(built))
        for key, value in sections[section].items():  # every key of the file reached its config
            got = getattr(built, key)
            got = dataclasses.asdict(got) if dataclasses.is_dataclass(got) else got
            if isinstance(value, dict):
                assert value.items() <= got.items(), (section, key)
            else:
                assert got == value, (section, key, got, value)


def test_resolve_config_name_path_and_errors(tmp_path):
    assert resolve_config("easy-vqa") == str(preset_path("easy-vqa"))
    assert resolve_config("easy-vqa.yaml") == str(preset_path("easy-vqa"))
    assert resolve_config("configs/easy-vqa.yaml") == str(preset_path("easy-vqa"))  # the old checkout path
    own = tmp_path / "mine.yaml"
    own.write_text("train:\n  epochs: 1\n")
    assert resolve_config(str(own)) == str(own)
    with pytest.raises(FileNotFoundError, match="easy-vqa-gru"):  # the error lists the presets
        resolve_config("easy-vqa-typo")
    with pytest.raises(ValueError, match="not found; available presets"):
        preset_path("../pyproject")


def test_train_print_config_by_name(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["train", "--config", "easy-vqa", "--print_config"])
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["vision"]["name"] == "efficientnet-lite0" and printed["data"]["dataset"] == "easy-vqa"


def test_unknown_preset_is_a_clear_cli_error(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["train", "--config", "no-such-preset", "--print_config"])
    assert done.value.code == 2
    assert "available presets" in capsys.readouterr().err
