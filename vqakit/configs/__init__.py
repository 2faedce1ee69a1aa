"""The presets: small YAML recipes shipped inside the package, usable by name from an installed wheel.

    vqakit list_models                       # easy-vqa, easy-vqa-gru, ..., vqa-v2
    vqakit train --config easy-vqa           # a preset by name
    vqakit train --config my-recipe.yaml     # or any YAML file

Each file holds the ``model`` / ``data`` / ``train`` sections of ``vqakit train`` (the generative families use
``gru`` / ``llm`` / ``vlm`` for their model section). As litgpt's ``config_hub/`` and open_clip's
``model_configs/*.json``, the presets are package data (``[tool.setuptools.package-data]`` in pyproject.toml),
so ``pip install vqakit`` has them and no checkout is needed.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

SUFFIX = ".yaml"


def _folder() -> Path:
    return Path(str(resources.files(__name__)))


def list_presets() -> list[str]:
    """The preset names, sorted: ``vqakit train --config NAME`` takes any of them."""
    return sorted(p.name[: -len(SUFFIX)] for p in _folder().glob(f"*{SUFFIX}"))


def preset_path(name: str) -> Path:
    """The file of preset ``name`` (``easy-vqa`` or ``easy-vqa.yaml``).

    >>> preset_path("easy-vqa").name
    'easy-vqa.yaml'
    """
    stem = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name
    path = _folder() / f"{stem}{SUFFIX}"
    if "/" in stem or "\\" in stem or not path.is_file():
        raise ValueError(f"preset {name!r} not found; available presets = {', '.join(list_presets())} "
                         "(or pass the path of a YAML file)")
    return path


def resolve_config(value: str) -> str:
    """What ``--config VALUE`` reads: an existing file as given, else the packaged preset of that name.

    ``configs/NAME.yaml`` (the path inside a checkout before the presets moved into the package) also resolves
    to preset NAME when no such file exists, so older commands keep working.

    >>> resolve_config("easy-vqa").endswith("vqakit/configs/easy-vqa.yaml")
    True
    """
    path = Path(value)
    if path.is_file():
        return value
    stem = path.name[: -len(SUFFIX)] if path.name.endswith(SUFFIX) else path.name
    if path.parent in (Path("."), Path("configs")) and path.suffix in ("", SUFFIX) and stem in list_presets():
        return str(preset_path(stem))
    raise FileNotFoundError(f"--config {value}: no such file, and not a preset name; available presets = "
                            f"{', '.join(list_presets())}")
