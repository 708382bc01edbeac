"""The one routine that turns rendered pieces into tokens; `render` and `bridge` both use it.

A renderer describes each message as pieces: strings (template text, special tokens written
as text), `Text` (message content: strings whose special-token look-alikes stay ordinary text)
and `ImagePart`s. Consecutive strings are tokenized as one run, exactly as a chat template's
output string would be, so token boundaries match the HF reference; an image becomes the
model's pad token repeated as its grid implies, and an `ImageRef` with an absolute offset.
An image inside a run is written as its one pad token (a special token, so the tokenizer splits
there as it would at the run's edge) and expanded afterwards: each run, however many images it
holds, is one tokenizer call.

The HF template tokenizes `<|im_end|>` inside a tool result as the control token, so a tool
result can forge a whole turn. Here only the template's own markers are control tokens
(`plain_content=False` restores the HF behaviour, for parity checks).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

from rollwire.errors import RenderError
from rollwire.messages import ImagePart
from rollwire.render.tokens import TextTokenizer
from rollwire.render.types import ImageRef, RenderedTokens

if TYPE_CHECKING:
    from rollwire.features import FeatureStore, ImageFeatures, ImageProcessor
    from rollwire.images import ImageLimits

Piece: TypeAlias = "str | ImagePart"


class Text(str):
    """Message content (or other caller data) inside the pieces: its special-token text is plain."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class ImageTokens:
    """A renderer's one image handle: the placeholder id, the store its features live in (and so
    the processor that makes them), the image limits."""

    pad_id: int
    store: FeatureStore
    limits: ImageLimits | None = None
    pad_text: str | None = None  # the pad token as text: images then tokenize inline, in one call per run

    @property
    def processor(self) -> ImageProcessor:
        return self.store.config


class Emitter:
    """Accumulates pieces (tagged with a message index) into a `RenderedTokens`.

    Starting from `base` (a previous prompt) continues its token stream: new image offsets
    are absolute in the combined stream. Only the new tokens are kept here; the base's ids are
    joined to them once, in `finish`.
    """

    def __init__(
        self, tokenizer: TextTokenizer, images: ImageTokens | None, base: RenderedTokens | None = None,
        *, plain_content: bool = True,
    ) -> None:
        self._tok = tokenizer
        self._plain_content = plain_content
        self._images = images
        self._base: tuple[int, ...] = base.token_ids if base else ()
        self.token_ids: list[int] = []  # the tokens after the base's
        self.runs: list[tuple[int, int, bool]] = list(base.runs) if base else []
        self.refs: list[ImageRef] = list(base.images) if base else []
        self._run: list[str] = []
        self._run_index: list[int] = []
        # Images inside the current run, written as one pad token (char start, id, length, grid), so a
        # run spanning images is still one tokenizer call; each pad is expanded when the run is encoded.
        self._slots: list[tuple[int, ImageFeatures]] = []
        self._run_chars = 0
        self._pad_text = images.pad_text if images is not None else None
        self._inline_images = bool(self._pad_text and tokenizer.special_pattern is not None
                                   and tokenizer.special_pattern.fullmatch(self._pad_text))

    @property
    def image_count(self) -> int:
        return len(self.refs) + len(self._slots)

    def emit(self, index: int, pieces: Iterable[Piece]) -> None:
        for piece in pieces:
            if isinstance(piece, str):
                if piece:
                    self._append(index, piece)
            else:
                self._emit_image(index, piece)

    def _append(self, index: int, piece: str) -> None:
        self._run.append(piece)
        self._run_index.append(index)
        self._run_chars += len(piece)

    def tokens(self, index: int, token_ids: Sequence[int], *, sampled: bool) -> None:
        """Append already-tokenized ids (a sampled completion) without re-tokenizing them."""
        self._flush()
        self.token_ids.extend(int(t) for t in token_ids)
        self._label(index, sampled, len(token_ids))

    def finish(self, num_messages: int) -> RenderedTokens:
        self._flush()
        return RenderedTokens(token_ids=self._base + tuple(self.token_ids), runs=tuple(self.runs),
                              images=tuple(self.refs), num_messages=num_messages)

    @property
    def length(self) -> int:
        """Tokens so far, the base's included."""
        return len(self._base) + len(self.token_ids)

    def _label(self, index: int, sampled: bool, count: int) -> None:
        """The last `count` tokens render message `index` (sampled or not): extend the last run or start one."""
        if not count:
            return
        runs, end = self.runs, self.length
        if runs and runs[-1][1] == index and runs[-1][2] == sampled:
            runs[-1] = (end, index, sampled)
        else:
            runs.append((end, index, sampled))

    def _emit_image(self, index: int, part: ImagePart) -> None:
        if self._images is None:
            raise RenderError("this renderer does not support images")
        features = self._images.store.get_or_process(part.image, limits=self._images.limits)
        if self._inline_images:
            assert self._pad_text is not None
            self._slots.append((self._run_chars, features))
            self._append(index, self._pad_text)
            return
        self._flush()
        self._add_image(index, features)

    def _add_image(self, index: int, features: ImageFeatures) -> None:
        assert self._images is not None
        length = features.num_tokens
        self.refs.append(ImageRef(features.id, self.length, length, features.grid_thw))
        self.token_ids.extend([self._images.pad_id] * length)
        self._label(index, False, length)

    def _flush(self) -> None:
        if not self._run:
            return
        text = "".join(self._run)
        starts: list[int] = []
        pos = 0
        for chunk in self._run:
            starts.append(pos)
            pos += len(chunk)
        slots = iter(self._slots)
        slot = next(slots, None)
        token_ids, run_index = self.token_ids, self._run_index
        label, count = -2, 0  # tokens appended but not yet labelled: `count` of message `label`
        for token_id, start in self._encode(text, starts):
            index = run_index[bisect.bisect_right(starts, start) - 1]
            if slot is not None and start == slot[0]:
                assert self._images is not None
                if token_id != self._images.pad_id:
                    raise RenderError(f"internal error: the image placeholder at character {start} tokenized "
                                      f"as {token_id}, not the pad token {self._images.pad_id}")
                self._label(label, False, count)
                label, count = -2, 0
                self._add_image(index, slot[1])
                slot = next(slots, None)
                continue
            if index != label:
                self._label(label, False, count)
                label, count = index, 0
            token_ids.append(token_id)
            count += 1
        self._label(label, False, count)
        if slot is not None:
            raise RenderError(f"internal error: the image placeholder at character {slot[0]} was not tokenized")
        self._run.clear()
        self._run_index.clear()
        self._slots.clear()
        self._run_chars = 0

    def _encode(self, text: str, starts: list[int]) -> list[tuple[int, int]]:
        """(id, start offset) of each token of a run. Where content holds special-token text, the
        run is split at the template's own special tokens only, and the rest is encoded plainly."""
        pattern = self._tok.special_pattern
        content = [(s, s + len(c)) for s, c in zip(starts, self._run, strict=True) if isinstance(c, Text)]
        if not (self._plain_content and pattern is not None
                and any(pattern.search(text, a, b) for a, b in content)):
            encoding = self._tok.encode(text)
            return [(t, o[0]) for t, o in zip(encoding.ids, encoding.offsets, strict=True)]
        out: list[tuple[int, int]] = []
        pos = 0
        for match in pattern.finditer(text):
            if any(a < match.end() and match.start() < b for a, b in content):
                continue  # content: stays text
            out += self._plain(text, pos, match.start())
            out.append((self._tok.token_id(match.group()), match.start()))
            pos = match.end()
        return out + self._plain(text, pos, len(text))

    def _plain(self, text: str, start: int, end: int) -> list[tuple[int, int]]:
        if start >= end:
            return []
        encoding = self._tok.encode_plain(text[start:end])
        return [(t, start + o[0]) for t, o in zip(encoding.ids, encoding.offsets, strict=True)]
