"""Gemma 4: the official template (`google-gemma-4-31B-it.jinja`), token for token.

Turns are `<|turn>ROLE\\n...<turn|>\\n` after `<bos>` (the assistant is `model`). Thinking on puts
`<|think|>` at the top of a system turn; thinking off ends the generation prompt with an empty
thought channel. Tools are declared and called in Gemma's own notation (`<|"|>` quotes strings);
tool results are written inside the model turn that called them, right after its calls, and the
model continues that turn (no generation prompt after them; the assistant's text follows its
tool results, as the template orders it). An image is `<|image>`, its soft tokens (`<|image|>`),
`<image|>`. As the template raises or drops: a system message must be text; images in a tool
result are refused (the template would drop them silently). Tool-call arguments are written as
the mapping they hold (the template would paste a JSON string verbatim).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from rollwire.errors import RenderError
from rollwire.features.gemma4 import Gemma4Vision
from rollwire.messages import ImagePart, Message, TextPart, ToolCall
from rollwire.render.base import MessageContext, TemplateRenderer
from rollwire.render.emit import Piece
from rollwire.render.family import Family, RenderOptions, TinySpec
from rollwire.render.tokens import TextTokenizer

if TYPE_CHECKING:
    from rollwire.features import FeatureStore
    from rollwire.images import ImageLimits
    from rollwire.render.model_dir import ModelDir

TURN, END = "<|turn>", "<turn|>"
CHANNEL, CHANNEL_END = "<|channel>", "<channel|>"
CALL, CALL_END = "<|tool_call>", "<tool_call|>"
RESPONSE, RESPONSE_END = "<|tool_response>", "<tool_response|>"
Q = '<|"|>'
_STANDARD_KEYS = ("description", "type", "properties", "required", "nullable")


def _sorted(mapping: Mapping[str, Any]) -> list[tuple[str, Any]]:
    return sorted(mapping.items(), key=lambda kv: kv[0].lower() if isinstance(kv[0], str) else kv[0])  # dictsort


def _upper(value: Any) -> str:
    return "" if value is None else str(value).upper()


def argument(value: Any, *, escape_keys: bool = True) -> str:
    """The template's `format_argument`."""
    if isinstance(value, str):
        return f"{Q}{value}{Q}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "{" + ",".join((f"{Q}{k}{Q}" if escape_keys else str(k)) + ":" + argument(v, escape_keys=escape_keys)
                              for k, v in _sorted(value)) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(argument(v, escape_keys=escape_keys) for v in value) + "]"
    return str(value)


def _required(items: Sequence[Any]) -> str:
    return "required:[" + ",".join(f"{Q}{r}{Q}" for r in items) + "]"


def _parameters(properties: Mapping[str, Any]) -> str:
    """The template's `format_parameters` (its `required` argument is unused there too)."""
    out: list[str] = []
    for key, value in _sorted(properties):
        if key in _STANDARD_KEYS:
            continue
        fields: list[str] = []
        if value.get("description"):
            fields.append(f"description:{Q}{value['description']}{Q}")
        kind = _upper(value.get("type"))
        if kind == "STRING" and value.get("enum"):
            fields.append("enum:" + argument(value["enum"]))
        elif kind == "ARRAY" and isinstance(value.get("items"), Mapping) and value["items"]:
            fields.append("items:{" + ",".join(_item(k, v, value["items"]) for k, v in _sorted(value["items"])
                                               if v is not None) + "}")
        if value.get("nullable"):
            fields.append("nullable:true")
        if kind == "OBJECT":
            nested = value.get("properties")
            fields.append("properties:{" + _parameters(nested if isinstance(nested, Mapping) else value) + "}")
            if value.get("required"):
                fields.append(_required(value["required"]))
        fields.append(f"type:{Q}{kind}{Q}")
        out.append(f"{key}:{{" + ",".join(fields) + "}")
    return ",".join(out)


def _item(key: str, value: Any, items: Mapping[str, Any]) -> str:
    if key == "properties":
        return "properties:{" + (_parameters(value) if isinstance(value, Mapping) else "") + "}"
    if key == "required":
        return _required(value)
    if key == "type":
        return "type:" + argument(value.upper() if isinstance(value, str) else [str(v).upper() for v in value])
    return f"{key}:{argument(value)}"


def declaration(tool: Mapping[str, Any]) -> str:
    """The template's `format_function_declaration` of one tool, trimmed."""
    fn = tool.get("function", tool)
    out = f"declaration:{fn['name']}{{description:{Q}{fn.get('description') or ''}{Q}"
    params = fn.get("parameters")
    if params:
        out += ",parameters:{"
        if params.get("properties"):
            out += "properties:{" + _parameters(params["properties"]) + "},"
        if params.get("required"):
            out += _required(params["required"]) + ","
        if params.get("type"):
            out += f"type:{Q}{_upper(params['type'])}{Q}}}"
    if "response" in fn:
        response = fn["response"]
        out += ",response:{"
        if response.get("description"):
            out += f"description:{Q}{response['description']}{Q},"
        if _upper(response.get("type")) == "OBJECT":
            out += f"type:{Q}OBJECT{Q}}}"
    return (out + "}").strip()


def format_tool_call(call: ToolCall) -> str:
    args = ",".join(f"{k}:{argument(v, escape_keys=False)}" for k, v in _sorted(call.arguments_dict()))
    return f"{CALL}call:{call.name}{{{args}}}{CALL_END}"


def strip_thinking(text: str) -> str:
    """The template's `strip_thinking`: thought channels removed, then trimmed."""
    return "".join(part.split(CHANNEL)[0] if CHANNEL in part else part for part in text.split(CHANNEL_END)).strip()


def _model_text(message: Message) -> str:
    """An assistant's content as the template writes it: each text part without its thoughts, trimmed."""
    if isinstance(message.content, str):
        return strip_thinking(message.content)
    return "".join(strip_thinking(p.text) for p in message.parts if isinstance(p, TextPart))


# --- reading a completion back ------------------------------------------------------------------

_CALL_HEAD = re.compile(r"<\|tool_call>call:([^{<]+)\{")
_NUMBER = re.compile(r"-?\d+(\.\d*)?([eE][+-]?\d+)?")


class _Reader:
    """A recursive-descent reader of Gemma's argument notation (the inverse of `argument`)."""

    def __init__(self, text: str, at: int) -> None:
        self.text, self.at = text, at

    def fail(self, what: str) -> RenderError:
        return RenderError(f"malformed Gemma tool call at character {self.at}: {what}")

    def value(self) -> Any:
        t, at = self.text, self.at
        if t.startswith(Q, at):
            end = t.find(Q, at + len(Q))
            if end < 0:
                raise self.fail("unterminated string")
            self.at = end + len(Q)
            return t[at + len(Q) : end]
        if t.startswith("{", at):
            self.at += 1
            return self.mapping("}")
        if t.startswith("[", at):
            self.at += 1
            items: list[Any] = []
            while not t.startswith("]", self.at):
                items.append(self.value())
                if t.startswith(",", self.at):
                    self.at += 1
                elif not t.startswith("]", self.at):
                    raise self.fail("expected ',' or ']'")
            self.at += 1
            return items
        for word, parsed in (("true", True), ("false", False), ("None", None), ("null", None)):
            if t.startswith(word, at):
                self.at += len(word)
                return parsed
        number = _NUMBER.match(t, at)
        if number is None:
            raise self.fail("expected a value")
        self.at = number.end()
        return json.loads(number.group(0)) if number.group(0)[-1] != "." else float(number.group(0))

    def mapping(self, close: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        t = self.text
        while not t.startswith(close, self.at):
            if t.startswith(Q, self.at):
                key = self.value()
            else:
                colon = t.find(":", self.at)
                if colon < 0:
                    raise self.fail("expected 'key:'")
                key, self.at = t[self.at : colon], colon
            if not t.startswith(":", self.at):
                raise self.fail("expected ':'")
            self.at += 1
            out[key] = self.value()
            if t.startswith(",", self.at):
                self.at += 1
            elif not t.startswith(close, self.at):
                raise self.fail(f"expected ',' or {close!r}")
        self.at += len(close)
        return out


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall], str | None]:
    """(text outside the calls, calls, error) of a completion's text."""
    calls: list[ToolCall] = []
    outside: list[str] = []
    at = 0
    for match in _CALL_HEAD.finditer(text):
        if match.start() < at:
            continue
        outside.append(text[at : match.start()])
        reader = _Reader(text, match.end())
        try:
            args = reader.mapping("}")
        except RenderError as exc:
            return "".join(outside) + text[match.start() :], calls, str(exc)
        if not text.startswith(CALL_END, reader.at):
            return "".join(outside) + text[match.start() :], calls, f"tool call {len(calls)} is not closed"
        calls.append(ToolCall(name=match.group(1), arguments=json.dumps(args, ensure_ascii=False),
                              id=f"call_{len(calls)}"))
        at = reader.at + len(CALL_END)
    outside.append(text[at:])
    rest = "".join(outside)
    if CALL in rest:
        return rest, calls, "unreadable tool call"
    return rest, calls, None


# --- the renderer -------------------------------------------------------------------------------


class Gemma4Renderer(TemplateRenderer):
    family = "gemma4"
    turn_end: ClassVar[str] = END
    turn_separator: ClassVar[str] = "\n"
    stop_tokens: ClassVar[tuple[str, ...]] = (RESPONSE, "<eos>")
    vision_tokens: ClassVar[tuple[str, ...]] = ("<|image>", "<|image|>", "<image|>", "<|video|>", "<|audio>",
                                                "<|audio|>", "<audio|>")
    image_pad: ClassVar[str | None] = "<|image|>"

    def __init__(self, tokenizer: TextTokenizer, *, feature_store: FeatureStore | None = None,
                 limits: ImageLimits | None = None, enable_thinking: bool = True) -> None:
        super().__init__(tokenizer, feature_store=feature_store, limits=limits)
        self.enable_thinking = enable_thinking
        self.response_id = tokenizer.token_id(RESPONSE)

    def _system_turn(self, content: str, tools: Sequence[Mapping[str, Any]] | None) -> str:
        think = "<|think|>\n" if self.enable_thinking else ""
        declared = "".join(f"<|tool>{declaration(t)}<tool|>" for t in tools or ())
        return f"{TURN}system\n{think}{content}{declared}{END}\n"

    def preamble(self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None) -> list[Piece]:
        if messages[0].role != "system" and (self.enable_thinking or tools):
            return ["<bos>", self._system_turn("", tools)]
        return ["<bos>"]

    def message_pieces(self, message: Message, ctx: MessageContext) -> list[Piece]:
        if message.role == "system" and ctx.is_first:
            if not isinstance(message.content, str):
                raise RenderError("messages[0]: the Gemma 4 template takes a system message's content as a string")
            return [self._system_turn(message.content.strip(), ctx.tools)]
        if message.role == "tool":
            return self._tool_pieces(message, ctx)
        if message.role == "assistant":
            return self._assistant_pieces(message, ctx)
        return [f"{TURN}{message.role}\n", *self._content(message, ctx), f"{END}\n"]

    def _content(self, message: Message, ctx: MessageContext) -> list[Piece]:
        if isinstance(message.content, str):
            return [message.content.strip()]
        pieces: list[Piece] = []
        count = ctx.image_count
        for part in message.parts:
            if isinstance(part, TextPart):
                pieces.append(part.text.strip())
            elif isinstance(part, ImagePart):
                count += 1
                pieces.extend(self.image_pieces(part, count))
        return pieces

    def image_pieces(self, part: ImagePart, number: int) -> list[Piece]:
        return ["<|image>", part, "<image|>"]

    def _assistant_pieces(self, message: Message, ctx: MessageContext) -> list[Piece]:
        if message.images:
            raise RenderError(f"messages[{ctx.index}]: the gemma4 renderer does not take images in assistant messages")
        out = "" if ctx.prev_role in ("assistant", "tool") else f"{TURN}model\n"  # the same model turn goes on
        reasoning = message.reasoning_content
        if reasoning and message.tool_calls and ctx.index > ctx.last_query:
            out += f"{CHANNEL}thought\n{reasoning}\n{CHANNEL_END}"
        out += "".join(format_tool_call(c) for c in message.tool_calls)
        if message.tool_calls and ctx.next_role == "tool":
            return [out]  # the results follow; the content comes after them (see _tool_pieces)
        out += _model_text(message)
        return [out + (RESPONSE if message.tool_calls else f"{END}\n")]

    def _tool_pieces(self, message: Message, ctx: MessageContext) -> list[Piece]:
        if message.images:
            raise RenderError(f"messages[{ctx.index}]: the Gemma 4 template drops images in tool results; "
                              "send them in a user message")
        caller = ctx.caller
        if caller is None or not caller.tool_calls or ctx.prev_role not in ("assistant", "tool"):
            raise RenderError(f"messages[{ctx.index}]: a tool result must follow an assistant message that calls "
                              "a tool")
        name = message.name
        for call in caller.tool_calls:  # as the template resolves it (two missing ids match too)
            if call.id == message.tool_call_id:
                name = call.name
        if name is None and ctx.continuation and len({c.name for c in caller.tool_calls}) == 1:
            name = caller.tool_calls[0].name  # the sampled calls' ids are rollwire's; one name is unambiguous
        if name is None:
            raise RenderError(f"messages[{ctx.index}]: tool_call_id {message.tool_call_id!r} names no call and the "
                              "message has no name (the template fails on it)")
        sampled = ctx.continuation and ctx.prev_role == "assistant"  # the completion ended with the opener
        out = ("" if sampled else RESPONSE) + f"response:{name}{{value:{argument(message.text)}}}{RESPONSE_END}"
        if ctx.next_role != "tool" and not ctx.continuation and caller.content:
            out += _model_text(caller) + f"{END}\n"  # the caller's own text, then its turn closes
        return [out]

    def generation_prompt(self) -> list[Piece]:
        return [f"{TURN}model\n" + ("" if self.enable_thinking else f"{CHANNEL}thought\n{CHANNEL_END}")]

    def generation_prompt_after(self, last: Message) -> list[Piece]:
        """Nothing after a model turn that called tools: the model goes on in that turn."""
        caller = last if last.role == "assistant" else None
        if last.role == "tool" or (caller is not None and caller.tool_calls):
            return []
        return self.generation_prompt()

    def last_query_index(self, messages: Sequence[Message]) -> int:
        return max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)

    def close_turn(self, completion: Sequence[int], first_new: Message) -> tuple[list[int], list[Piece]] | None:
        """After a call the model stops on `<|tool_response>`, the first result's opener; a result
        after any other ending is not where the template would put it: decline."""
        if first_new.role == "tool":
            return ([], []) if completion and completion[-1] == self.response_id else None
        if completion and completion[-1] == self.response_id:
            return None  # the template would write the results inside the turn first
        return super().close_turn(completion, first_new)

    def split_response(self, text: str) -> tuple[str, str | None, list[ToolCall], str | None]:
        reasoning: str | None = None
        if CHANNEL in text:
            thoughts = [p.split(CHANNEL, 1)[1] for p in text.split(CHANNEL_END) if CHANNEL in p]
            reasoning = "\n".join(t.removeprefix("thought\n").removesuffix("\n") for t in thoughts)
            text = "".join(p.split(CHANNEL)[0] for p in text.split(CHANNEL_END))
        outside, calls, error = parse_tool_calls(text)
        return (outside.strip() if calls else outside), reasoning, calls, error


def _renderer(model: ModelDir, options: RenderOptions) -> Gemma4Renderer:
    return Gemma4Renderer(model.tokenizer, feature_store=options.store_for(model, Gemma4Vision),
                          limits=options.limits, enable_thinking=options.enable_thinking)


# Tiny model: two text layers (sliding + full attention), a one-layer vision tower, real vocabulary.
GEMMA4 = Family(
    name="gemma4", model_types={"gemma4": "Gemma4ForConditionalGeneration"}, make_renderer=_renderer,
    vision=Gemma4Vision,
    tiny=TinySpec(
        config_class="Gemma4Config", model_class="Gemma4ForConditionalGeneration",
        config={"text_config": {"vocab_size": 262144, "hidden_size": 64, "intermediate_size": 128,
                                "num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"],
                                "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
                                "global_head_dim": 32, "sliding_window": 64, "hidden_size_per_layer_input": 0,
                                "vocab_size_per_layer_input": 262144, "max_position_embeddings": 32768},
                "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16,
                                  "patch_size": 16, "pooling_kernel_size": 3, "position_embedding_size": 1024,
                                  # the soft-token budget vLLM reads (real checkpoints carry it)
                                  "default_output_length": 70},
                "audio_config": None},
        tokenizer="gemma4", chat_template="gemma4",
        image_processor={"class": "Gemma4ImageProcessorPil", "max_soft_tokens": 70}, revision=1),
)
