"""The family registry: one record per family, asked by the renderer factory, the local engine and
the tiny-model builder; a model directory is read once and handed on."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import rollwire.render.registry as registry
from rollwire.errors import UnsupportedModelError
from rollwire.render import (
    GENERIC,
    ModelDir,
    create_renderer,
    detect_family,
    families,
    family_names,
    get_family,
    register_family,
)
from rollwire.render.qwen_vl import QWEN2_VL, Qwen2VLRenderer
from rollwire.tiny_model import tiny_families

BUILTIN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3", "qwen3_5", "gemma4")


@pytest.fixture
def clean_registry() -> Iterator[None]:
    """Registrations made by a test do not leak into the others."""
    saved = dict(registry._FAMILIES), dict(registry._MODEL_TYPES)
    yield
    registry._FAMILIES.clear()
    registry._FAMILIES.update(saved[0])
    registry._MODEL_TYPES.clear()
    registry._MODEL_TYPES.update(saved[1])


def test_builtin_families_are_registered_with_their_model_types(tiny: Callable[[str], Path]) -> None:
    assert {f.name for f in families()} == set(BUILTIN)
    assert family_names()[-1] == GENERIC
    assert set(tiny_families()) == set(BUILTIN)
    assert set(get_family("qwen3_vl").model_types) == {"qwen3_vl", "qwen3_vl_moe"}
    for name in BUILTIN:
        assert detect_family(tiny(name)) == name
        assert create_renderer(tiny(name)).family == name
        assert get_family(name).is_vision == (name != "qwen3")


def test_a_name_or_model_type_is_claimed_once(clean_registry: None) -> None:
    with pytest.raises(UnsupportedModelError, match="already registered"):
        register_family(dataclasses.replace(QWEN2_VL, name="other", model_types={"qwen2_vl": None}))
    with pytest.raises(UnsupportedModelError, match="already registered"):
        register_family(QWEN2_VL)
    with pytest.raises(UnsupportedModelError, match="fallback"):
        register_family(dataclasses.replace(QWEN2_VL, name=GENERIC))
    with pytest.raises(UnsupportedModelError, match="unknown family 'nope'"):
        get_family("nope")


def test_a_user_family_is_picked_up_everywhere(tiny: Callable[[str], Path], tmp_path: Path,
                                               clean_registry: None) -> None:
    """A new model type served by an existing renderer: one `register_family` call is enough for
    detection, the renderer factory and the local engine's model class."""
    d = tmp_path / "mine"
    shutil.copytree(tiny("qwen2_vl"), d)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "model_type": "my_vl"}))
    assert detect_family(d) == GENERIC
    register_family(dataclasses.replace(QWEN2_VL, name="my_vl",
                                        model_types={"my_vl": "Qwen2VLForConditionalGeneration"}))
    assert detect_family(d) == "my_vl"
    renderer = create_renderer(d)
    assert isinstance(renderer, Qwen2VLRenderer)
    import transformers

    from rollwire.engines.local_model import model_class

    is_vision, cls = model_class(transformers, ModelDir.load(d))
    assert is_vision and cls is transformers.Qwen2VLForConditionalGeneration


def test_model_dir_is_read_once_and_handed_on(tiny: Callable[[str], Path], tmp_path: Path) -> None:
    """After `ModelDir.load` (and its tokenizer's first use), the folder's files are not needed:
    the renderer is built from what was read."""
    d = tmp_path / "copy"
    shutil.copytree(tiny("qwen2_vl"), d)
    model = ModelDir.load(d)
    assert model.model_type == "qwen2_vl" and model.preprocessor is not None
    assert model.chat_template is not None and "<|vision_start|>" in model.chat_template
    tokenizer = model.tokenizer
    shutil.rmtree(d)
    d.mkdir()  # an empty folder: nothing left to read
    renderer = create_renderer(model)
    assert renderer.tokenizer is tokenizer  # type: ignore[attr-defined]
    reference = create_renderer(tiny("qwen2_vl"))
    msgs = [{"role": "user", "content": "hi"}]
    assert renderer.render(msgs).token_ids == reference.render(msgs).token_ids


@pytest.mark.parametrize(("files", "match"), [
    ({}, "no config.json"),
    ({"config.json": "[1]"}, "not a JSON object"),
    ({"config.json": "{nope"}, "cannot read"),
    ({"config.json": "{}", "preprocessor_config.json": "{"}, "cannot read"),
])
def test_model_dir_names_the_bad_file(tmp_path: Path, files: dict[str, str], match: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(UnsupportedModelError, match=match):
        ModelDir.load(tmp_path)
    with pytest.raises(UnsupportedModelError, match="does not exist"):
        ModelDir.load(tmp_path / "missing")
