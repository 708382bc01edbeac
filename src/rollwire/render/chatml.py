"""Shared machinery of the ChatML families (Qwen2-VL, Qwen2.5-VL, Qwen3, Qwen3-VL).

A family subclass only says how messages become pieces (`_emit_conversation`, and
`_emit_continuation` for the messages that follow a sampled assistant turn) and how a
completion's text splits into content, reasoning and tool calls. Rendering, the multi-turn
bridge and response parsing live here, once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rollwire.errors import RenderError
from rollwire.messages import ImagePart, Message, MessageLike, TextPart, parse_messages, parse_tools
from rollwire.render.emit import Emitter, ImageTokens, Piece
from rollwire.render.tokens import TextTokenizer
from rollwire.render.types import BridgeResult, ParsedResponse, RenderedTokens, ResponseStatus

if TYPE_CHECKING:
    from rollwire.features import FeatureStore
    from rollwire.images import ImageLimits

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


class ChatMLRenderer:
    """Base of the `<|im_start|>role ... <|im_end|>` renderers."""

    family = "chatml"
    supports_images = False
    add_vision_id = False

    def __init__(
        self,
        tokenizer: TextTokenizer,
        *,
        feature_store: FeatureStore | None = None,
        limits: ImageLimits | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.im_end_id = tokenizer.token_id(IM_END)
        eot = tokenizer.optional_token_id(ENDOFTEXT)
        self.stop_token_ids: tuple[int, ...] = (self.im_end_id,) + ((eot,) if eot is not None else ())
        self.vision_token_ids: tuple[int, ...] = tuple(
            t for t in (tokenizer.optional_token_id(s) for s in VISION_TOKENS) if t is not None
        )
        self.feature_store = feature_store
        self.merge_size = feature_store.config.merge_size if feature_store is not None else 2
        self._images: ImageTokens | None = None
        if self.supports_images:
            if feature_store is None:
                raise RenderError(f"the {self.family} renderer needs a feature store for images")
            self._images = ImageTokens(tokenizer.token_id(IMAGE_PAD), feature_store, limits)

    # --- what a family defines ------------------------------------------------------------

    def _emit_conversation(
        self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None, em: Emitter
    ) -> None:
        raise NotImplementedError

    def _emit_continuation(self, messages: Sequence[Message], first_index: int, em: Emitter) -> None:
        """Emit messages (no assistant among them) that follow a sampled assistant turn."""
        raise NotImplementedError

    def _generation_prompt(self) -> list[Piece]:
        return [f"{IM_START}assistant\n"]

    def _split_response(self, text: str) -> tuple[str, str | None, list[Any], str | None]:
        """(content, reasoning, tool calls, error) of a completion's text."""
        raise NotImplementedError

    # --- shared --------------------------------------------------------------------------

    @property
    def image_pad_id(self) -> int | None:
        return self._images.pad_id if self._images else None

    def _emitter(self, base: RenderedTokens | None = None) -> Emitter:
        return Emitter(self.tokenizer, self._images, base)

    def render(
        self,
        messages: Sequence[MessageLike],
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        add_generation_prompt: bool = True,
    ) -> RenderedTokens:
        msgs, tools = parse_messages(messages), parse_tools(tools)
        if not msgs:
            raise RenderError("cannot render an empty conversation")
        em = self._emitter()
        self._emit_conversation(msgs, tools, em)
        if add_generation_prompt:
            em.emit(len(msgs), self._generation_prompt())
        return em.finish(len(msgs))

    def bridge(
        self,
        previous_prompt: RenderedTokens,
        previous_completion_ids: Sequence[int],
        new_messages: Sequence[MessageLike],
        *,
        add_generation_prompt: bool = True,
    ) -> BridgeResult:
        """Extend the previous prompt and its sampled completion with only the new messages.

        The result's ids start with `previous_prompt.token_ids + previous_completion_ids`
        byte for byte; a completion that did not end with the turn-close token gets it added
        as non-sampled context. Returns `tokens=None` with a reason when extension cannot
        give what a full render would (the caller then renders the whole conversation).
        """
        assistant_index = previous_prompt.num_messages
        n = len(previous_prompt.token_ids)
        if n == 0 or previous_prompt.message_index[-1] != assistant_index:
            return BridgeResult(None, "previous prompt does not end with a generation prompt")
        if not new_messages:
            return BridgeResult(None, "no new messages")
        msgs = parse_messages(new_messages, start_index=assistant_index + 1, after_assistant=True)
        if any(m.role == "assistant" for m in msgs):
            return BridgeResult(None, "assistant message in the new messages")
        completion = [int(t) for t in previous_completion_ids]
        vision = set(self.vision_token_ids)
        if any(t in vision for t in completion):
            return BridgeResult(None, "completion contains a vision token")
        em = self._emitter(previous_prompt)
        em.tokens(assistant_index, completion, sampled=True)
        if not completion or completion[-1] != self.im_end_id:
            em.tokens(assistant_index, [self.im_end_id], sampled=False)
        em.emit(assistant_index, ["\n"])
        first = assistant_index + 1
        self._emit_continuation(msgs, first, em)
        if add_generation_prompt:
            em.emit(first + len(msgs), self._generation_prompt())
        return BridgeResult(em.finish(first + len(msgs)))

    def parse_response(self, completion_ids: Sequence[int]) -> ParsedResponse:
        ids = [int(t) for t in completion_ids]
        stopped = bool(ids) and ids[-1] in self.stop_token_ids
        body = ids[:-1] if stopped else ids
        status: ResponseStatus = "stop" if stopped else "length"
        vision = set(self.vision_token_ids)
        sampled_vision = [k for k, t in enumerate(body) if t in vision]
        text = self.tokenizer.decode(body)
        content, reasoning, calls, error = self._split_response(text)
        if sampled_vision:
            error = f"sampled a vision token at completion position {sampled_vision[0]}"
        if error is not None and (stopped or sampled_vision):
            status = "malformed"
        message = Message(
            role="assistant",
            content=content,
            tool_calls=tuple(calls),
            reasoning_content=reasoning,
            token_ids=tuple(ids),
        )
        return ParsedResponse(message, status, error)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(token_ids)

    # --- small helpers for families ------------------------------------------------------

    def _content_pieces(self, message: Message, em: Emitter | None) -> list[Piece]:
        """Text and image parts in order; an image is ["Picture k: "] vision_start, image, vision_end.

        Without an emitter, images are numbered from 1 (for inspecting text only).
        """
        pieces: list[Piece] = []
        count = em.image_count if em is not None else 0
        for part in message.parts:
            if isinstance(part, TextPart):
                pieces.append(part.text)
            elif isinstance(part, ImagePart):
                if not self.supports_images:
                    raise RenderError(f"the {self.family} renderer does not take images")
                count += 1
                if self.add_vision_id:
                    pieces.append(f"Picture {count}: ")
                pieces.extend((VISION_START, part, VISION_END))
        return pieces
