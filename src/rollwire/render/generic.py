"""Fallback for any other model: its own chat template through transformers, text only.

Correct by construction for a full render (it is the reference), but it cannot know where a
sampled turn ends in template terms, so `bridge` always declines and the caller re-renders.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rollwire.errors import RenderError
from rollwire.messages import Message, MessageLike, message_to_dict, parse_messages, parse_tools
from rollwire.render.tokens import TextTokenizer
from rollwire.render.types import BridgeResult, ParsedResponse, RenderedTokens, ResponseStatus


class ChatTemplateRenderer:
    family = "generic"
    vision_token_ids: tuple[int, ...] = ()
    structure_token_ids: tuple[int, ...] = ()
    feature_store = None  # text only
    images = None
    image_pad_id = None
    merge_size = 2
    image_refusal = "the generic chat-template renderer does not take images"

    def __init__(self, hf_tokenizer: Any, **template_kwargs: Any) -> None:
        if not getattr(hf_tokenizer, "chat_template", None):
            raise RenderError("the tokenizer has no chat template")
        self.hf_tokenizer = hf_tokenizer
        self.tokenizer = TextTokenizer.from_hf(hf_tokenizer)
        self.template_kwargs = template_kwargs
        eos = getattr(hf_tokenizer, "eos_token_id", None)
        self.stop_token_ids: tuple[int, ...] = (int(eos),) if eos is not None else ()

    def _text(self, messages: Sequence[Message], tools: Any, add_generation_prompt: bool) -> str:
        dicts = [message_to_dict(m) for m in messages]
        text = self.hf_tokenizer.apply_chat_template(
            dicts, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt,
            **self.template_kwargs,
        )
        return str(text)

    def render(
        self,
        messages: Sequence[MessageLike],
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        add_generation_prompt: bool = True,
    ) -> RenderedTokens:
        msgs, tools = parse_messages(messages), parse_tools(tools)
        if any(m.images for m in msgs):
            raise RenderError(self.image_refusal)
        text = self._text(msgs, tools, add_generation_prompt)
        # Message boundaries: where each prefix's rendering ends, when it is a prefix of the whole.
        bounds: list[int] = []
        for k in range(1, len(msgs) + 1):
            prefix = self._text(msgs[:k], tools, False)
            bounds.append(len(prefix) if text.startswith(prefix) else -1)
        encoding = self.tokenizer.encode(text)
        index: list[int] = []
        for start, _end in encoding.offsets:
            k = next((i for i, b in enumerate(bounds) if b > start), len(msgs))
            index.append(k if all(b >= 0 for b in bounds) else -1)
        return RenderedTokens.from_labels(encoding.ids, index, [False] * len(index), (), len(msgs))

    def bridge(
        self,
        previous_prompt: RenderedTokens,
        previous_completion_ids: Sequence[int],
        new_messages: Sequence[MessageLike],
        *,
        add_generation_prompt: bool = True,
    ) -> BridgeResult:
        return BridgeResult(None, "generic chat template: extension is not supported")

    def parse_response(self, completion_ids: Sequence[int]) -> ParsedResponse:
        ids = self.tokenizer.check_ids(completion_ids, "completion_ids")
        stopped = bool(ids) and ids[-1] in self.stop_token_ids
        text = self.tokenizer.decode(ids[:-1] if stopped else ids, skip_special_tokens=True)
        status: ResponseStatus = "stop" if stopped else "length"
        return ParsedResponse(Message(role="assistant", content=text, token_ids=tuple(ids)), status)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(token_ids)
