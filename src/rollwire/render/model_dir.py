"""A model directory, read once: config, tokenizer, preprocessor config, chat template.

The renderer, the local engine and the server all take a `ModelDir` instead of re-reading the
folder; `ModelDir.load` names the file that is missing or unreadable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rollwire.errors import UnsupportedModelError
from rollwire.render.tokens import TextTokenizer

TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnsupportedModelError(f"cannot read {path}: {exc}") from None
    if not isinstance(value, dict):
        raise UnsupportedModelError(f"{path} is not a JSON object")
    return value


@dataclass(frozen=True)
class ModelDir:
    """What rollwire reads from a Hugging Face model folder (each file once)."""

    path: Path
    config: dict[str, Any]
    preprocessor: dict[str, Any] | None = None
    chat_template: str | None = None
    generation_config: dict[str, Any] | None = None
    _tokenizer: list[TextTokenizer] = field(default_factory=list, repr=False, compare=False)

    @classmethod
    def load(cls, path: str | Path) -> ModelDir:
        root = Path(path)
        if not root.is_dir():
            raise UnsupportedModelError(f"model directory {root} does not exist")
        config = _read_json(root / "config.json")
        if config is None:
            raise UnsupportedModelError(f"no config.json in {root}: pass family= explicitly")
        return cls(path=root, config=config, preprocessor=_read_json(root / "preprocessor_config.json"),
                   chat_template=_template(root), generation_config=_read_json(root / "generation_config.json"))

    @classmethod
    def from_tokenizer(cls, tokenizer: TextTokenizer, *, model_type: str) -> ModelDir:
        """A directory-less stand-in around a tokenizer object (no config files, family defaults)."""
        return cls(path=Path(f"<{model_type} tokenizer>"), config={"model_type": model_type},
                   _tokenizer=[tokenizer])

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type"))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def tokenizer(self) -> TextTokenizer:
        """The directory's `tokenizer.json`, loaded on first use and then shared."""
        if not self._tokenizer:
            self._tokenizer.append(TextTokenizer.from_dir(self.path))
        return self._tokenizer[0]


def _template(root: Path) -> str | None:
    """The Jinja source of the directory's chat template, looked up as transformers does."""
    jinja = root / TEMPLATE_FILES[0]
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UnsupportedModelError(f"cannot read {jinja}: {exc}") from None
    for name in TEMPLATE_FILES[1:]:
        value = (_read_json(root / name) or {}).get("chat_template")
        if isinstance(value, str):
            return value
    return None
