"""A thin, thread-safe view of a `tokenizers.Tokenizer`: encode with offsets, decode, look up ids.

`encode` splits the tokenizer's special tokens out of the text as control tokens (what a chat
template's own markers need); `encode_plain` reads them as ordinary text (what message content
needs, so a tool result cannot forge a turn).
"""

from __future__ import annotations

import operator
import re
import threading
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

import tokenizers

from rollwire.errors import RenderError


class TextTokenizer:
    """Encodes text exactly as the HF fast tokenizer does (added tokens split, no BOS)."""

    def __init__(self, backend: tokenizers.Tokenizer) -> None:
        self.backend = backend
        specials = sorted((t.content for t in backend.get_added_tokens_decoder().values() if t.special),
                          key=len, reverse=True)
        # Special tokens as a regex (longest first), or None when the tokenizer has none.
        self.special_pattern: re.Pattern[str] | None = (
            re.compile("|".join(map(re.escape, specials))) if specials else None)
        self._plain: tokenizers.Tokenizer | None = None
        self._plain_lock = threading.Lock()

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> TextTokenizer:
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise RenderError(f"no tokenizer.json in {model_dir}")
        return cls(tokenizers.Tokenizer.from_file(str(path)))

    @classmethod
    def from_hf(cls, tokenizer: Any) -> TextTokenizer:
        """From a transformers tokenizer (its Rust backend) or a `tokenizers.Tokenizer`."""
        if isinstance(tokenizer, tokenizers.Tokenizer):
            return cls(tokenizer)
        backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
        if not isinstance(backend, tokenizers.Tokenizer):
            raise RenderError(f"{type(tokenizer).__name__} has no fast (tokenizers) backend")
        return cls(backend)

    def encode(self, text: str) -> tokenizers.Encoding:
        return self.backend.encode(text, add_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        """Ids this tokenizer can decode, added tokens included."""
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def check_ids(self, token_ids: Sequence[object], what: str) -> list[int]:
        """`token_ids` as a list of ints in this tokenizer's vocabulary, or a `RenderError` naming
        the first that is not (bools, floats, strings, negative or out-of-range ids)."""
        if isinstance(token_ids, (str, bytes, Mapping, AbstractSet)) or not hasattr(token_ids, "__iter__"):
            raise RenderError(f"{what} must be a sequence of token ids, got {type(token_ids).__name__}")
        vocab = self.vocab_size
        ids: list[Any] = list(token_ids)
        if not ids or ({*map(type, ids)} == {int} and min(ids) >= 0 and max(ids) < vocab):
            return ids  # plain ints, all in range: the usual case, checked by C loops
        out: list[int] = []
        for k, t in enumerate(ids):  # the first bad one, named
            try:
                if isinstance(t, bool):
                    raise TypeError
                value = operator.index(t)
            except TypeError:
                raise RenderError(f"{what}[{k}] is {type(t).__name__} {t!r}, not a token id") from None
            if not 0 <= value < vocab:
                raise RenderError(f"{what}[{k}] = {value} is outside the vocabulary [0, {vocab})")
            out.append(value)
        return out

    def encode_plain(self, text: str) -> tokenizers.Encoding:
        """Encode with special-token text as ordinary text (non-special added tokens still match)."""
        if self._plain is None:
            with self._plain_lock:
                if self._plain is None:
                    plain = tokenizers.Tokenizer.from_str(self.backend.to_str())
                    plain.encode_special_tokens = True
                    self._plain = plain
        return self._plain.encode(text, add_special_tokens=False)

    def encode_ids(self, text: str) -> list[int]:
        return list(self.encode(text).ids)

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise RenderError(f"the tokenizer has no token {token!r}")
        return int(token_id)

    def optional_token_id(self, token: str) -> int | None:
        token_id = self.backend.token_to_id(token)
        return None if token_id is None else int(token_id)
