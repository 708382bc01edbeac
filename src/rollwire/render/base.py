"""The one loop that both `render` and `bridge` run; a family only says how one message renders.

A family subclass of `TemplateRenderer` defines `message_pieces(message, ctx)` (the pieces of
one message, or None when the template drops it), optionally `preamble` (pieces before the first
message, e.g. a default system prompt), `generation_prompt`, and `split_response` (content,
reasoning and tool calls of a completion's text). Its special tokens are class data: the
turn-close token and separator the bridge appends after a sampled turn, stop, vision and pad
tokens. Rendering, the multi-turn bridge and response parsing live here, once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from rollwire.errors import RenderError
from rollwire.messages import ImagePart, Message, MessageLike, TextPart, ToolCall, parse_messages, parse_tools
from rollwire.render.emit import Emitter, ImageTokens, Piece, Text
from rollwire.render.tokens import TextTokenizer
from rollwire.render.types import BridgeResult, ParsedResponse, RenderedTokens, ResponseStatus

if TYPE_CHECKING:
    from rollwire.features import FeatureStore
    from rollwire.images import ImageLimits


@dataclass(frozen=True, slots=True)
class MessageContext:
    """Where a message stands, as a chat template sees it.

    `index` is the message's index in the whole conversation; `prev_role`/`next_role` its
    neighbours' roles (the sampled assistant turn counts as the previous message of the first
    new one in a continuation); `last_query` the index of the last user query of the messages
    being rendered; `continuation` is True when the messages follow a sampled assistant turn
    (the bridge); `image_count` the images emitted before this message; `caller` the last assistant
    message before this one (in a bridge, the sampled turn read back), whose calls a tool message answers.
    """

    index: int
    prev_role: str | None
    next_role: str | None
    last_query: int
    is_last: bool
    continuation: bool
    image_count: int
    tools: Sequence[Mapping[str, Any]] | None
    caller: Message | None = None

    @property
    def is_first(self) -> bool:
        return self.index == 0 and not self.continuation


class TemplateRenderer:
    """Base of the renderers that mirror a chat template piece by piece."""

    family: str = "template"
    # Family data (token strings; ids are looked up in the tokenizer).
    turn_end: ClassVar[str] = ""  # closes a message; appended after a completion cut before it
    turn_separator: ClassVar[str] = ""  # template text between a message's close and the next one
    stop_tokens: ClassVar[tuple[str, ...]] = ()  # optional ones are skipped when absent
    vision_tokens: ClassVar[tuple[str, ...]] = ()  # never sampled (banned) nor left in a completion
    structure_tokens: ClassVar[tuple[str, ...]] = ()  # template markers a completion must not contain
    image_pad: ClassVar[str | None] = None  # the placeholder an image expands to (None: text only)
    add_vision_id = False
    # Special-token text in message content stays text (False: control tokens, as HF templates do).
    plain_content = True

    def __init__(
        self,
        tokenizer: TextTokenizer,
        *,
        feature_store: FeatureStore | None = None,
        limits: ImageLimits | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.turn_end_id = tokenizer.token_id(self.turn_end)
        stops = (tokenizer.optional_token_id(s) for s in (self.turn_end, *self.stop_tokens))
        self.stop_token_ids: tuple[int, ...] = tuple(dict.fromkeys(t for t in stops if t is not None))
        self.vision_token_ids: tuple[int, ...] = tuple(
            t for t in (tokenizer.optional_token_id(s) for s in self.vision_tokens) if t is not None)
        self.structure_token_ids: tuple[int, ...] = tuple(
            t for t in (tokenizer.optional_token_id(s) for s in self.structure_tokens) if t is not None)
        self.feature_store = feature_store
        self.merge_size = feature_store.config.merge_size if feature_store is not None else 2
        self._images: ImageTokens | None = None
        if self.image_pad is not None:
            if feature_store is None:
                raise RenderError(f"the {self.family} renderer needs a feature store for images")
            self._images = ImageTokens(tokenizer.token_id(self.image_pad), feature_store, limits, self.image_pad)

    # --- what a family defines ------------------------------------------------------------

    def message_pieces(self, message: Message, ctx: MessageContext) -> list[Piece] | None:
        raise NotImplementedError

    def preamble(self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None) -> list[Piece]:
        """Pieces before the first message that belong to none (index -1)."""
        return []

    def generation_prompt(self) -> list[Piece]:
        raise NotImplementedError

    def generation_prompt_after(self, last: Message) -> list[Piece]:
        """The generation prompt after the last message; templates that continue a turn override this."""
        return self.generation_prompt()

    def image_pieces(self, part: ImagePart, number: int) -> list[Piece]:
        """How the template writes the `number`-th image (from 1) of the conversation."""
        return [part]

    def last_query_index(self, messages: Sequence[Message]) -> int:
        """Index (in `messages`) of the last user query; templates that need it override this."""
        return len(messages) - 1

    def split_response(self, text: str) -> tuple[str, str | None, list[ToolCall], str | None]:
        """(content, reasoning, tool calls, error) of a completion's text."""
        raise NotImplementedError

    def close_turn(self, completion: Sequence[int], first_new: Message) -> tuple[list[int], list[Piece]] | None:
        """What follows a sampled assistant turn before the next message: non-sampled ids (the turn
        close, when the completion was cut before it) and template text; None declines the bridge
        (a family whose template continues the turn differently says so here)."""
        return ([] if completion and completion[-1] == self.turn_end_id else [self.turn_end_id]), [self.turn_separator]

    # --- shared --------------------------------------------------------------------------

    @property
    def images(self) -> ImageTokens | None:
        return self._images

    @property
    def image_pad_id(self) -> int | None:
        return self._images.pad_id if self._images else None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def im_end_id(self) -> int:  # the ChatML name of the turn-close token, kept for callers
        return self.turn_end_id

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
        em = Emitter(self.tokenizer, self._images, plain_content=self.plain_content)
        em.emit(-1, self.preamble(msgs, tools))
        self._emit_messages(em, msgs, 0, prev_role=None, tools=tools)
        if add_generation_prompt:
            em.emit(len(msgs), self.generation_prompt_after(msgs[-1]))
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
        if n == 0 or previous_prompt.last_message_index != assistant_index:
            return BridgeResult(None, "previous prompt does not end with a generation prompt")
        if not new_messages:
            return BridgeResult(None, "no new messages")
        msgs = parse_messages(new_messages, start_index=assistant_index + 1, after_assistant=True)
        if any(m.role == "assistant" for m in msgs):
            return BridgeResult(None, "assistant message in the new messages")
        completion = self.tokenizer.check_ids(previous_completion_ids, "previous_completion_ids")
        vision = set(self.vision_token_ids)
        if any(t in vision for t in completion):
            return BridgeResult(None, "completion contains a vision token")
        closing = self.close_turn(completion, msgs[0])
        if closing is None:
            return BridgeResult(None, f"the {self.family} template does not continue this turn by extension")
        em = Emitter(self.tokenizer, self._images, previous_prompt, plain_content=self.plain_content)
        em.tokens(assistant_index, completion, sampled=True)
        em.tokens(assistant_index, closing[0], sampled=False)
        em.emit(assistant_index, closing[1])
        first = assistant_index + 1
        sampled = self.parse_response(completion).message if any(m.role == "tool" for m in msgs) else None
        self._emit_messages(em, msgs, first, prev_role="assistant", tools=None, caller=sampled)
        if add_generation_prompt:
            em.emit(first + len(msgs), self.generation_prompt_after(msgs[-1]))
        return BridgeResult(em.finish(first + len(msgs)))

    def _emit_messages(self, em: Emitter, msgs: Sequence[Message], first: int, *, prev_role: str | None,
                       tools: Sequence[Mapping[str, Any]] | None, caller: Message | None = None) -> None:
        last_query = first + self.last_query_index(msgs)
        for k, message in enumerate(msgs):
            caller = msgs[k - 1] if k and msgs[k - 1].role == "assistant" else caller
            ctx = MessageContext(
                index=first + k, prev_role=msgs[k - 1].role if k else prev_role,
                next_role=msgs[k + 1].role if k + 1 < len(msgs) else None, last_query=last_query,
                is_last=k == len(msgs) - 1, continuation=prev_role is not None,
                image_count=em.image_count, tools=tools, caller=caller)
            pieces = self.message_pieces(message, ctx)
            if pieces is not None:
                em.emit(ctx.index, pieces)

    def parse_response(self, completion_ids: Sequence[int]) -> ParsedResponse:
        ids = self.tokenizer.check_ids(completion_ids, "completion_ids")
        stopped = bool(ids) and ids[-1] in self.stop_token_ids
        body = ids[:-1] if stopped else ids
        status: ResponseStatus = "stop" if stopped else "length"
        vision = set(self.vision_token_ids)
        sampled_vision = [k for k, t in enumerate(body) if t in vision]
        text = self.tokenizer.decode(body)
        content, reasoning, calls, error = self.split_response(text)
        if sampled_vision:
            error = f"sampled a vision token at completion position {sampled_vision[0]}"
        if error is not None and (stopped or sampled_vision):
            status = "malformed"
        message = Message(role="assistant", content=content, tool_calls=tuple(calls),
                          reasoning_content=reasoning, token_ids=tuple(ids))
        return ParsedResponse(message, status, error)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(token_ids)

    def content_pieces(self, message: Message, image_count: int = 0) -> list[Piece]:
        """Text and image parts in order, images written by `image_pieces` and numbered on from
        `image_count`."""
        pieces: list[Piece] = []
        for part in message.parts:
            if isinstance(part, TextPart):
                pieces.append(Text(part.text))
            elif isinstance(part, ImagePart):
                if self._images is None:
                    raise RenderError(f"the {self.family} renderer does not take images")
                image_count += 1
                pieces.extend(self.image_pieces(part, image_count))
        return pieces
