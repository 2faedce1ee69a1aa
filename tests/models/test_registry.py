"""The model-family registry: every record imports, config and predictor match their ``model_type``."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from vqakit.models.registry import (
    MODEL_FAMILIES,
    family_of_config,
    generative_types,
    model_family,
    model_types,
    register,
)

FAMILIES = list(MODEL_FAMILIES.values())


def test_the_registered_families():
    assert model_types() == ["chat_vlm", "gru_decoder", "llm_prefix", "two_tower", "vlm"]
    assert generative_types() == ("gru_decoder", "llm_prefix", "vlm", "chat_vlm")


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.model_type)
def test_every_record_imports(family):
    config, model, predictor = family.config_class(), family.model_class(), family.predictor_class()
    assert dataclasses.is_dataclass(config)
    assert callable(model.from_pretrained) and callable(model.save_pretrained)
    assert callable(predictor.from_pretrained)
    assert callable(family.fit_function())
    if family.training is not None:
        module = family.training_module()
        assert module.KEY == family.train_key  # the key of the resolved config.yaml
        for name in ("build", "dataset", "apply_strategies", "save"):
            assert callable(getattr(module, name)), name


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.model_type)
def test_model_type_round_trip(family):
    from vqakit.inference.predict import PREDICTOR_CLASSES, predictor_class

    config = family.config_class()()  # the defaults: no download, nothing built
    assert config.to_dict()["model_type"] == family.model_type
    assert family_of_config(config) is family
    assert model_family(family.model_type) is family
    assert PREDICTOR_CLASSES[family.model_type] == family.predictor
    assert predictor_class(family.model_type) is family.predictor_class()


def test_unknown_model_type_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown model_type='two_towers'; available = \['chat_vlm', .*'vlm'\]"):
        model_family("two_towers")
    with pytest.raises(ValueError, match="object is not the config of a registered model family"):
        family_of_config(object())
    with pytest.raises(ValueError, match="already registered"):
        register(model_family("vlm"))


def test_predictor_classes_is_read_only():
    from vqakit.inference.predict import PREDICTOR_CLASSES

    with pytest.raises(TypeError):
        PREDICTOR_CLASSES["two_tower"] = "x:Y"  # type: ignore[index]
    with pytest.raises(TypeError):
        MODEL_FAMILIES["two_tower"] = None  # type: ignore[index]


def test_inference_imports_no_training_code():
    code = ("import sys; import vqakit.inference.generative, vqakit.inference.model_card, vqakit.models.registry; "
            "print(sorted(m for m in sys.modules if m.startswith(('vqakit.train', 'lightning'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
