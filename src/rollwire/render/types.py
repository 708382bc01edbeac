"""What a renderer produces and promises: rendered tokens, image refs, parsed responses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeAlias, runtime_checkable

import msgspec

from rollwire.errors import RenderError
from rollwire.messages import Message, MessageLike

if TYPE_CHECKING:
    from rollwire.features import FeatureStore
    from rollwire.render.emit import ImageTokens


class ImageRef(msgspec.Struct, frozen=True):
    """A small pointer to one image occurrence in a token stream.

    `offset` is the index of the first placeholder (pad) token, `length` the number of pad
    tokens; the pixels live in the feature store under `id`.
    """

    id: str
    offset: int
    length: int
    grid_thw: tuple[int, int, int]

    @property
    def end(self) -> int:
        return self.offset + self.length

    def shifted(self, delta: int) -> ImageRef:
        return ImageRef(self.id, self.offset + delta, self.length, self.grid_thw)


class RenderedTokens(msgspec.Struct, frozen=True):
    """Token ids with, per token, the index of the message they render and whether the model
    sampled them, plus the image refs (offsets absolute, in order).

    Tokens outside any message (a default system prompt) have message index -1; the
    generation prompt and a sampled completion carry index `num_messages` of the turn that
    produced them.

    The ids are a tuple and the per-token labels are kept as `runs`: a rollout holds every
    turn's prompt until it ends, and the garbage collector walks each element of a list on
    every full pass (at 256 rollouts x 8 turns of 1024² images, 12 M elements: 171 ms a pass, scripts/gc_pass.py),
    while it stops tracking a tuple of ints. A bridge then copies the previous ids once and
    its few runs, not three per-token lists. `message_index` and `sampled_mask` are made on
    demand.
    """

    token_ids: tuple[int, ...]
    # (end, message index, sampled): consecutive tokens [previous end, end) with the same labels
    runs: tuple[tuple[int, int, bool], ...]
    images: tuple[ImageRef, ...]
    num_messages: int

    @classmethod
    def from_labels(cls, token_ids: Sequence[int], message_index: Sequence[int], sampled_mask: Sequence[bool],
                    images: tuple[ImageRef, ...], num_messages: int) -> RenderedTokens:
        """From one message index and one sampled flag per token."""
        if not len(token_ids) == len(message_index) == len(sampled_mask):
            raise RenderError(f"{len(token_ids)} token ids, {len(message_index)} message indices and "
                             f"{len(sampled_mask)} sampled flags")
        runs: list[tuple[int, int, bool]] = []
        for end, (index, sampled) in enumerate(zip(message_index, sampled_mask, strict=True), 1):
            if runs and runs[-1][1] == index and runs[-1][2] == bool(sampled):
                runs[-1] = (end, index, bool(sampled))
            else:
                runs.append((end, int(index), bool(sampled)))
        return cls(tuple(int(t) for t in token_ids), tuple(runs), images, num_messages)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def message_index(self) -> list[int]:
        """The index of the message each token renders."""
        return self._expand(1)

    @property
    def sampled_mask(self) -> list[bool]:
        """Whether the model sampled each token."""
        return self._expand(2)  # type: ignore[return-value]

    @property
    def last_message_index(self) -> int | None:
        """The message index of the last token (None when there are no tokens)."""
        return self.runs[-1][1] if self.runs else None

    def _expand(self, field: int) -> list[int | bool]:
        out: list[int | bool] = []
        start = 0
        for run in self.runs:
            out += [run[field]] * (run[0] - start)
            start = run[0]
        return out

    @property
    def image_ids(self) -> tuple[str, ...]:
        return tuple(ref.id for ref in self.images)


ResponseStatus: TypeAlias = Literal["stop", "length", "malformed"]


@dataclass(frozen=True, slots=True)
class ParsedResponse:
    """A sampled completion read back as an assistant message.

    `status` is "stop" when it ended with a stop token, "length" when it was cut, and
    "malformed" when its structure is broken (bad tool call, a sampled vision token); `error`
    then says what.
    """

    message: Message
    status: ResponseStatus
    error: str | None = None


@dataclass(frozen=True, slots=True)
class BridgeResult:
    """The next-turn prompt built by extension, or `tokens=None` with the reason it was not."""

    tokens: RenderedTokens | None
    reason: str | None = None

    def __bool__(self) -> bool:
        return self.tokens is not None


@runtime_checkable
class Renderer(Protocol):
    family: str
    stop_token_ids: tuple[int, ...]
    vision_token_ids: tuple[int, ...]
    # Template markers a completion must never contain (ChatML: <|im_start|>).
    structure_token_ids: tuple[int, ...]

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can decode (a larger model embedding's padding rows are not among them)."""

    @property
    def images(self) -> ImageTokens | None:
        """The image handle (pad id, feature store, processor); None for text-only families."""

    @property
    def feature_store(self) -> FeatureStore | None:
        """Where the renderer's image features live (None for text-only families)."""

    @property
    def image_pad_id(self) -> int | None:
        """The image placeholder token (None for text-only families)."""

    @property
    def merge_size(self) -> int: ...

    def render(
        self,
        messages: Sequence[MessageLike],
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        add_generation_prompt: bool = True,
    ) -> RenderedTokens: ...

    def bridge(
        self,
        previous_prompt: RenderedTokens,
        previous_completion_ids: Sequence[int],
        new_messages: Sequence[MessageLike],
        *,
        add_generation_prompt: bool = True,
    ) -> BridgeResult: ...

    def parse_response(self, completion_ids: Sequence[int]) -> ParsedResponse: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...
