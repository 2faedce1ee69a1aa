"""The model families vqakit knows, by the ``model_type`` written in a checkpoint's ``config.json``.

One record per family names its config, model and predictor classes and its training code as ``"module:Class"``
strings, imported only when asked for: looking a family up imports nothing, so inference (which asks for the model
and predictor) never imports training code, and the CLI can list the families without loading torch models. This is
the one place model types are dispatched (transformers' ``CONFIG_MAPPING`` / ``MODEL_MAPPING`` idea, without the
auto-class machinery).

>>> model_family("gru_decoder").predictor
'vqakit.inference.generative:GenerativePredictor'
>>> model_family("two_towers")
Traceback (most recent call last):
    ...
ValueError: unknown model_type='two_towers'; available = ['chat_vlm', 'gru_decoder', 'llm_prefix', 'two_tower', 'vlm']
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


def import_ref(ref: str):
    """The object a ``"package.module:Name"`` string names (the module is imported now)."""
    module, _, name = ref.partition(":")
    obj = importlib.import_module(module)
    return getattr(obj, name) if name else obj


@dataclass(frozen=True)
class ModelFamily:
    """A model family: what ``config.json``'s ``model_type`` maps to.

    Args:
        model_type: the ``model_type`` its checkpoints record in ``config.json``.
        config: its config dataclass (``to_dict`` / ``from_dict``).
        model: its ``nn.Module`` with ``save_pretrained`` / ``from_pretrained``.
        predictor: the inference class serving its checkpoints (``from_pretrained(dir, device=, backend=, ...)``).
        fit: the training entry point, ``fit(config, data, train, evaluate=, command=)``.
        train_key: the ``vqakit train`` argument that holds its config (``--model``, ``--gru``, ...).
        training: the training family module (``build``, ``dataset``, ``apply_strategies``, ``save``) of a
            generative family; ``None`` for the classifier, which ``vqakit.train.run`` trains itself.
        description: one line for the model card.
        generative: answers with generated text (no fixed answer classes).
    """

    model_type: str
    config: str
    model: str
    predictor: str
    fit: str
    train_key: str
    training: str | None
    description: str
    generative: bool = True

    def config_class(self) -> type:
        return import_ref(self.config)

    def model_class(self) -> type:
        return import_ref(self.model)

    def predictor_class(self) -> type:
        return import_ref(self.predictor)

    def fit_function(self):
        return import_ref(self.fit)

    def training_module(self):
        """The training family module (imports training code: never call this from inference)."""
        if self.training is None:
            raise ValueError(f"model_type={self.model_type!r} has no generative training family module")
        return import_ref(self.training)


_GENERATIVE_FIT = "vqakit.train.generative:fit_generative"
_FAMILIES: dict[str, ModelFamily] = {
    f.model_type: f
    for f in (
        ModelFamily(
            "two_tower", "vqakit.models.two_tower:TwoTowerConfig",
            "vqakit.models.two_tower:TwoTowerForQuestionAnswering", "vqakit.inference.predict:VQAPredictor",
            fit="vqakit.train.run:fit", train_key="model", training=None, generative=False,
            description="two-tower answer classifier (pretrained vision + text towers, fusion, classifier over the "
                        "answers)",
        ),
        ModelFamily(
            "gru_decoder", "vqakit.models.gru_decoder:GRUDecoderConfig",
            "vqakit.models.gru_decoder:GRUDecoderForQuestionAnswering",
            "vqakit.inference.generative:GenerativePredictor", fit=_GENERATIVE_FIT, train_key="gru",
            training="vqakit.train.gru_family", description="two-tower encoder with a GRU answer decoder (generative)",
        ),
        ModelFamily(
            "llm_prefix", "vqakit.models.llm_prefix:LLMPrefixConfig",
            "vqakit.models.llm_prefix:LLMPrefixForQuestionAnswering",
            "vqakit.inference.generative:GenerativePredictor", fit=_GENERATIVE_FIT, train_key="llm",
            training="vqakit.train.llm_family",
            description="vision tower + projector prefixed to a causal language model (generative)",
        ),
        ModelFamily(
            "vlm", "vqakit.models.vlm:VLMConfig", "vqakit.models.vlm:VLMForQuestionAnswering",
            "vqakit.inference.generative:GenerativePredictor", fit=_GENERATIVE_FIT, train_key="vlm",
            training="vqakit.train.vlm_family", description="fine-tuned pretrained vision-language model (generative)",
        ),
        ModelFamily(
            "chat_vlm", "vqakit.models.chat_vlm:ChatVLMConfig", "vqakit.models.chat_vlm:ChatVLMForQuestionAnswering",
            "vqakit.inference.generative:ChatVLMPredictor", fit=_GENERATIVE_FIT, train_key="chat_vlm",
            training="vqakit.train.chat_vlm_family",
            description="fine-tuned chat vision-language model, answering in its chat template (generative)",
        ),
    )
}

MODEL_FAMILIES: Mapping[str, ModelFamily] = MappingProxyType(_FAMILIES)  # read-only; register() adds a family


def register(family: ModelFamily) -> ModelFamily:
    """Add a model family (e.g. from a plugin package); ``ValueError`` if its ``model_type`` is taken."""
    if family.model_type in _FAMILIES:
        raise ValueError(f"model_type={family.model_type!r} is already registered ({_FAMILIES[family.model_type]})")
    _FAMILIES[family.model_type] = family
    return family


def model_types() -> list[str]:
    """Every registered ``model_type``, sorted."""
    return sorted(_FAMILIES)


def model_family(model_type: str) -> ModelFamily:
    """The family of ``model_type``; ``ValueError`` listing the registered types when there is none."""
    try:
        return _FAMILIES[model_type]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model_type={model_type!r}; available = {model_types()}") from None


def family_of_config(config) -> ModelFamily:
    """The family whose config class ``config`` is an instance of (imports the registered config classes)."""
    for family in _FAMILIES.values():
        if isinstance(config, family.config_class()):
            return family
    raise ValueError(f"{type(config).__name__} is not the config of a registered model family; "
                     f"available = {[f.config.partition(':')[2] for f in _FAMILIES.values()]}")


def generative_types() -> tuple[str, ...]:
    """The ``model_type``s of the families that generate their answers, in registration order."""
    return tuple(t for t, f in _FAMILIES.items() if f.generative)


def upgrade_dotted_key(key: str) -> str:
    """A dotted config key named as an earlier version named it, as it is named now (``ConfigMixin.upgrade_keys``
    of the family whose ``vqakit train`` argument it is under); any other key as given.

    >>> upgrade_dotted_key("model.vision_grid_stride"), upgrade_dotted_key("llm.image_size")
    ('model.vision.grid_stride', 'llm.vision.image_size')
    >>> upgrade_dotted_key("model.hidden_size"), upgrade_dotted_key("vlm.image_size")
    ('model.hidden_size', 'vlm.image_size')
    """
    section, _, field = key.partition(".")
    family = next((f for f in _FAMILIES.values() if f.train_key == section), None)
    if family is None or not field or "." in field:
        return key
    path, node = [section], family.config_class().upgrade_keys({field: None})
    while isinstance(node, dict) and len(node) == 1:
        name, node = next(iter(node.items()))
        path.append(name)
    return ".".join(path)


def upgrade_recipe(recipe: dict) -> tuple[dict, list[tuple[str, str]]]:
    """A recipe (``{"model": ..., "data": ..., "train": ...}``, a ``--config`` YAML written by an earlier version)
    with every model family's section in today's names (``ConfigMixin.upgrade_keys``), and the ``(old, new)``
    dotted names it renamed.

    >>> recipe, renamed = upgrade_recipe({"model": {"vision_grid_stride": 16, "fusion": "spatial"}, "data": {}})
    >>> recipe
    {'model': {'fusion': 'spatial', 'vision': {'grid_stride': 16}}, 'data': {}}
    >>> renamed
    [('model.vision_grid_stride', 'model.vision.grid_stride')]
    """
    out, renamed = dict(recipe), []
    for family in _FAMILIES.values():
        section = out.get(family.train_key)
        if not isinstance(section, dict):
            continue
        new = family.config_class().upgrade_keys(dict(section))
        gone = [key for key in section if key not in new]
        if gone:
            out[family.train_key] = new
            renamed += [(f"{family.train_key}.{key}", upgrade_dotted_key(f"{family.train_key}.{key}")) for key in gone]
    return out, renamed
