"""The generic vision path: any other Hugging Face VLM with a chat template and a processor.

Each render goes through the model's own HF processor: its chat template writes the text (one
image token per image), its `replace_image_token` expands each image from the grid the feature
store holds (pixels are processed once, by content id), and its tokenizer encodes the result, so
token ids equal `processor.apply_chat_template(..., tokenize=True)`. Each image must become one
run of the image token of the length its grid implies (checked by `validate_placeholders`).
There is no bridge: every turn re-renders. Responses parse Hermes `<tool_call>` JSON.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rollwire.errors import FeatureError, RenderError, RollwireError, UnsupportedModelError
from rollwire.features import FeatureStore, ImageFeatures
from rollwire.features.hf import HFImageProcessor
from rollwire.images import ImageLimits
from rollwire.messages import ImagePart, Message, MessageLike, message_to_dict, parse_messages, parse_tools
from rollwire.render.emit import ImageTokens
from rollwire.render.generic import ChatTemplateRenderer
from rollwire.render.hermes import parse_tool_calls
from rollwire.render.model_dir import ModelDir
from rollwire.render.placeholders import validate_placeholders
from rollwire.render.tokens import TextTokenizer
from rollwire.render.types import BridgeResult, ImageRef, ParsedResponse, RenderedTokens, Renderer, ResponseStatus

# Processor/tokenizer attributes that name vision tokens, and special tokens whose text says vision.
_VISION_ATTRS = ("image_token", "video_token", "vision_start_token", "vision_end_token", "boi_token",
                 "eoi_token", "image_start_token", "image_end_token", "start_image_token", "end_image_token")
_VISION_WORDS = re.compile(r"image|vision|video|img", re.IGNORECASE)


class GenericVisionRenderer:
    """Renders through an HF processor (`ProcessorMixin`: tokenizer, image processor, image token)."""

    family = "generic"
    structure_token_ids: tuple[int, ...] = ()  # the template's markers are not known as data

    def __init__(self, processor: Any, *, feature_store: FeatureStore | None = None,
                 limits: ImageLimits | None = None, eos_token_ids: Sequence[int] = (),
                 image_processor: HFImageProcessor | None = None, **template_kwargs: Any) -> None:
        name = type(processor).__name__
        image_token = getattr(processor, "image_token", None)
        if not isinstance(image_token, str) or not hasattr(processor, "image_processor"):
            raise UnsupportedModelError(f"{name} is not a vision processor (no image processor or image token)")
        if not getattr(processor, "chat_template", None):
            raise RenderError(f"{name} has no chat template")
        self.processor = processor
        self.hf_tokenizer = processor.tokenizer
        self.tokenizer = TextTokenizer.from_hf(self.hf_tokenizer)
        self.image_token = image_token
        self._pad_id = self.tokenizer.token_id(image_token)
        adapter = image_processor or HFImageProcessor(processor.image_processor)
        if feature_store is None:
            feature_store = FeatureStore(adapter)
        elif feature_store.config.fingerprint() != adapter.fingerprint():
            raise RenderError(f"the feature store's processor ({feature_store.config.fingerprint()}) is not "
                              f"{adapter.name} ({adapter.fingerprint()})")
        self._store = feature_store
        self.limits = limits
        self._images = ImageTokens(self._pad_id, feature_store, limits)
        self.template_kwargs = template_kwargs
        eos = getattr(self.hf_tokenizer, "eos_token_id", None)
        stops = ([int(eos)] if eos is not None else []) + [int(t) for t in eos_token_ids]
        self.stop_token_ids: tuple[int, ...] = tuple(dict.fromkeys(stops))
        self.vision_token_ids: tuple[int, ...] = _vision_ids(processor, self.tokenizer)
        bos = getattr(self.hf_tokenizer, "bos_token", None)
        self._bos: str | None = bos if isinstance(bos, str) and bos else None

    @property
    def images(self) -> ImageTokens:
        return self._images

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def feature_store(self) -> FeatureStore:
        return self._store

    @property
    def image_pad_id(self) -> int:
        return self._pad_id

    @property
    def merge_size(self) -> int:
        return self._store.config.merge_size

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
        features = [self._store.get_or_process(p.image, limits=self.limits)
                    for m in msgs for p in m.parts if isinstance(p, ImagePart)]
        text = self._text(msgs, tools, add_generation_prompt)
        found = text.count(self.image_token)
        if found != len(features):
            raise RenderError(f"the chat template wrote {found} image token(s) for {len(features)} image(s)")
        expanded, spans = self._expand(text, features)
        # Like the processor: special tokens are added unless the template already starts with BOS.
        add_special = not (self._bos is not None and text.startswith(self._bos))
        encoding = self.tokenizer.backend.encode(expanded, add_special_tokens=add_special)
        ids = [int(t) for t in encoding.ids]
        refs = self._refs(ids, features)
        validate_placeholders(ids, refs, pad_id=self._pad_id, merge_size=self.merge_size)
        bounds = [self._bound(text, msgs[:k], tools) for k in range(1, len(msgs) + 1)]
        index: list[int] = []
        for start, end in encoding.offsets:
            if add_special and start == end:
                index.append(-1)  # a token the tokenizer adds (BOS) belongs to no message
                continue
            at = _original_offset(start, spans)
            k = next((i for i, b in enumerate(bounds) if b > at), len(msgs))
            index.append(k if all(b >= 0 for b in bounds) else -1)
        return RenderedTokens.from_labels(ids, index, [False] * len(ids), tuple(refs), len(msgs))

    def bridge(
        self,
        previous_prompt: RenderedTokens,
        previous_completion_ids: Sequence[int],
        new_messages: Sequence[MessageLike],
        *,
        add_generation_prompt: bool = True,
    ) -> BridgeResult:
        return BridgeResult(None, "generic vision path: the template's turn boundaries are unknown, "
                                  "so every turn re-renders")

    def parse_response(self, completion_ids: Sequence[int]) -> ParsedResponse:
        """Hermes `<tool_call>` JSON blocks become tool calls; the rest is the content. A sampled
        vision token, or a broken tool call in a finished turn, makes the response malformed."""
        ids = [int(t) for t in completion_ids]
        stopped = bool(ids) and ids[-1] in self.stop_token_ids
        body = ids[:-1] if stopped else ids
        status: ResponseStatus = "stop" if stopped else "length"
        vision = set(self.vision_token_ids)
        sampled_vision = [k for k, t in enumerate(body) if t in vision]
        content, calls, error = parse_tool_calls(self.tokenizer.decode(body, skip_special_tokens=True))
        if sampled_vision:
            error = f"sampled a vision token at completion position {sampled_vision[0]}"
        if error is not None and (stopped or sampled_vision):
            status = "malformed"
        message = Message(role="assistant", content=content, tool_calls=tuple(calls), token_ids=tuple(ids))
        return ParsedResponse(message, status, error)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(token_ids)

    # --- helpers ------------------------------------------------------------------------------

    def _text(self, msgs: Sequence[Message], tools: Any, add_generation_prompt: bool) -> str:
        dicts = [_template_dict(m) for m in msgs]
        try:
            text = self.processor.apply_chat_template(dicts, tools=tools, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt,
                                                      **self.template_kwargs)
        except RollwireError:
            raise
        except Exception as exc:  # jinja raises what the template says (raise_exception) or TypeError
            raise RenderError(f"the chat template rejects the conversation: {type(exc).__name__}: {exc}") from None
        return str(text)

    def _bound(self, text: str, prefix: Sequence[Message], tools: Any) -> int:
        """Where the rendering of `prefix` ends in `text`, or -1 when it is not a prefix of it."""
        part = self._text(prefix, tools, False)
        return len(part) if text.startswith(part) else -1

    def _expand(self, text: str, features: Sequence[ImageFeatures]) -> tuple[str, list[dict[str, Any]]]:
        """The processor's own expansion of each image token, from the stored grids."""
        if not features:
            return text, []
        grids = {"image_grid_thw": np.array([f.grid_thw for f in features], dtype=np.int64)}
        name = type(self.processor).__name__
        try:
            replacements = [str(self.processor.replace_image_token(grids, image_idx=k)) for k in range(len(features))]
            out, offsets = self.processor.get_text_with_replacements([text], replacements)
        except Exception as exc:
            raise UnsupportedModelError(f"{name} cannot expand images from their grid alone "
                                        f"({type(exc).__name__}: {exc})") from None
        return str(out[0]), list(offsets[0])

    def _refs(self, ids: Sequence[int], features: Sequence[ImageFeatures]) -> list[ImageRef]:
        runs = _runs(ids, self._pad_id)
        name = type(self.processor).__name__
        if len(runs) != len(features):
            raise UnsupportedModelError(f"{name} expands {len(features)} image(s) into {len(runs)} run(s) of "
                                        f"{self.image_token!r}: rollwire needs one run per image")
        return [ImageRef(f.id, start, length, f.grid_thw) for f, (start, length) in zip(features, runs, strict=True)]


def generic_renderer(model: ModelDir, *, feature_store: FeatureStore | None = None,
                     limits: ImageLimits | None = None) -> Renderer:
    """The vision renderer when the directory has an HF processor that rollwire can adapt, else the
    text-only chat-template renderer, which then refuses images saying why."""
    try:
        from transformers import AutoProcessor, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - transformers is a core dependency
        raise RenderError("the generic renderer needs transformers") from exc
    reason = f"{model.name} has no preprocessor_config.json"
    if model.preprocessor is not None:
        try:
            processor = AutoProcessor.from_pretrained(str(model.path))
        except Exception as exc:
            processor, reason = None, f"cannot load the processor of {model.name}: {exc}"
        if processor is not None and not hasattr(processor, "image_processor"):
            processor, reason = None, (f"{model.name}'s processor is a {type(processor).__name__}: name its "
                                       "processor_class in processor_config.json")
        if processor is not None:
            try:
                adapter = HFImageProcessor.from_pretrained(model.path)
                processor.image_processor = adapter.processor  # the PIL backend, where there is one
                eos = (model.generation_config or {}).get("eos_token_id")
                return GenericVisionRenderer(processor, feature_store=feature_store, limits=limits,
                                             eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []),
                                             image_processor=adapter)
            except (FeatureError, UnsupportedModelError) as exc:
                reason = str(exc)
    text = ChatTemplateRenderer(AutoTokenizer.from_pretrained(str(model.path)))
    text.image_refusal = f"the generic chat-template renderer does not take images: {reason}"
    return text


def _template_dict(message: Message) -> dict[str, Any]:
    """The message as HF chat templates take it: images as `{"type": "image"}`, tool-call
    arguments as a mapping (transformers' documented convention; OpenAI's JSON text is parsed)."""
    out = message_to_dict(message, image_repr=lambda _part: {"type": "image"})
    if message.tool_calls:
        out["tool_calls"] = [{**d, "function": {**d["function"], "arguments": c.arguments_dict()}}
                             for d, c in zip(out["tool_calls"], message.tool_calls, strict=True)]
    return out


def _vision_ids(processor: Any, tokenizer: TextTokenizer) -> tuple[int, ...]:
    names = [getattr(owner, a, None) for owner in (processor, processor.tokenizer) for a in _VISION_ATTRS]
    specials = getattr(processor.tokenizer, "all_special_tokens", []) or []
    names += [t for t in specials if isinstance(t, str) and _VISION_WORDS.search(t)]
    found = (tokenizer.optional_token_id(n) for n in names if isinstance(n, str) and n)
    return tuple(sorted({t for t in found if t is not None}))


def _runs(ids: Sequence[int], pad: int) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of `pad`."""
    runs: list[tuple[int, int]] = []
    start = None
    for i, t in enumerate([*ids, None]):
        if t == pad and start is None:
            start = i
        elif t != pad and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


def _original_offset(pos: int, spans: Sequence[Mapping[str, Any]]) -> int:
    """A character offset in the expanded text mapped back to the template's text."""
    shift = 0
    for span in spans:
        new_start, new_end = span["new_span"]
        if pos < new_start:
            break
        if pos < new_end:
            return int(span["span"][0])
        shift = new_end - int(span["span"][1])
    return pos - shift
