"""Sessions of the OpenAI front: one trajectory each, prompts bridged from the session's last turn.

An OpenAI client resends the whole conversation on every call. When it extends a turn of the
session (the same messages through an assistant message the front sampled, as the client saw
it, then only new ones), the next prompt is that turn's prompt + its completion ids + the new
messages rendered (`Renderer.bridge`), so sampled tokens are never re-rendered; otherwise (the
history was edited, the tools changed, the bridge declined) the conversation is rendered in
full and the reason recorded on the step and counted in the trajectory's metrics.

Images are read only for the messages that get rendered (the new ones when bridging), each once
per call, with the front's `ImageLimits`, and handed to the renderer as their encoded bytes: the
feature store decodes each once and (content_parts) keeps the client's own JPEG/PNG/WebP to send,
and the run directory archives that file as it is. The store pins what a call's render is handed
(`turn_lease`) until its request has returned and its step is written; an image evicted before
the upstream needs it again is recomputed from its archived original (`reload_from`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgspec

from rollwire.errors import ImageError, RenderError, StoreError, UnknownImageError
from rollwire.features import FeatureStore, PinLease
from rollwire.images import ImageLimits, decode_image, read_source
from rollwire.messages import ImagePart, ImageSource, Message, ToolCall, message_to_dict
from rollwire.render.types import RenderedTokens, Renderer
from rollwire.rollout.types import AssistantRecord, Step, Trajectory
from rollwire.store import RunReader

__all__ = ["ENV_NAME", "Session", "answer_message", "next_prompt", "reload_from", "turn_lease"]

ENV_NAME = "openai-front"  # the `env` of a front trajectory


@dataclass
class _Turn:
    """What a later call may extend: the conversation through the sampled assistant message."""

    conversation: list[Message]
    tools: list[dict[str, Any]] | None
    prompt: RenderedTokens
    completion_ids: list[int]


@dataclass
class Session:
    """One client session: its turns, the trajectory being recorded, the images it holds."""

    key: str
    trajectory_id: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    turns: list[_Turn] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    conversation: list[Message] = field(default_factory=list)  # the latest, through the last answer
    tools: list[dict[str, Any]] | None = None
    branch: int = 0
    seed: int = 0
    image_ids: dict[str, str] = field(default_factory=dict)  # image source (URL, path) -> image id
    # New images until the trajectory is written (then their blobs are on disk): their encoded bytes
    # by id, so an idle session holds no image (their features are in the store, pinned meanwhile).
    originals: dict[str, Any] = field(default_factory=dict)
    written_images: set[str] = field(default_factory=set)  # ids whose blobs are in the run directory
    metrics: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    ended: bool = False

    def written(self) -> None:
        """The trajectory and its images are on disk: let go of the new images' bytes."""
        self.written_images.update(self.originals)
        self.originals.clear()

    def record(self, messages: list[Message], tools: list[dict[str, Any]] | None, prompt: RenderedTokens,
               step: Step, answer: Message) -> None:
        """Add a sampled step; `answer` is the assistant message as the client received it."""
        if not step.bridged and self.turns:
            self.branch += 1
        self.steps.append(msgspec.structs.replace(step, branch=self.branch))
        self.conversation = [*messages, answer]
        self.tools = tools
        self.turns.append(_Turn(self.conversation, tools, prompt, list(step.completion_ids)))
        self.metrics["turns"] += 1
        self.metrics["prompt_tokens"] += len(prompt.token_ids)
        self.metrics["completion_tokens"] += len(step.completion_ids)

    def trajectory(self) -> Trajectory:
        """The session so far, as a trajectory (the conversation's images as ids)."""
        def image(part: ImagePart) -> dict[str, Any]:
            return {"type": "image", "image_id": self.image_ids.get(part.image) if isinstance(part.image, str)
                    else None}

        return Trajectory(
            id=self.trajectory_id, env=ENV_NAME, prompt_index=0, sample_index=0, seed=self.seed,
            steps=list(self.steps), messages=[message_to_dict(m, image_repr=image) for m in self.conversation],
            tools=self.tools, metadata={"session_id": self.key}, metrics=dict(self.metrics), finish="done")


def next_prompt(
    renderer: Renderer, session: Session, messages: list[Message], tools: list[dict[str, Any]] | None,
    limits: ImageLimits, lease: PinLease | None = None,
) -> tuple[RenderedTokens, bool, str | None]:
    """(prompt, bridged, why a full render) for `messages`: bridged from the latest turn they extend.
    With `lease` (`turn_lease`), every image the store hands the render is pinned to it, and it keeps
    only the prompt's."""
    with lease.collecting() if lease is not None else contextlib.nullcontext():
        prompt, bridged, reason = _next_prompt(renderer, session, messages, tools, limits)
    if lease is not None:
        lease.pin(i for i in prompt.image_ids if i in session.originals)  # a renderer past the store: from now on
        lease.retain(prompt.image_ids)  # what a declined bridge pinned and the full render did not use
    return prompt, bridged, reason


def _next_prompt(
    renderer: Renderer, session: Session, messages: list[Message], tools: list[dict[str, Any]] | None,
    limits: ImageLimits,
) -> tuple[RenderedTokens, bool, str | None]:
    reason = "first call"
    if session.turns:
        base = next((t for t in reversed(session.turns) if _extends(t.conversation, messages)), None)
        if base is None:
            reason = "history rewritten"
        elif base.tools != tools:
            reason = "tools changed"
        else:
            session.metrics["bridge_attempts"] += 1
            new = messages[len(base.conversation):]
            loaded, images = _loaded(new, limits)
            result = _rendering(images, limits, renderer.bridge, base.prompt, base.completion_ids, loaded)
            if result.tokens is not None:
                session.metrics["bridge_successes"] += 1
                _note(session, renderer, images, result.tokens.images[len(base.prompt.images):])
                return result.tokens, True, None
            reason = result.reason or "bridge declined"
        session.metrics[f"full_render:{reason}"] += 1
    loaded, images = _loaded(messages, limits)
    prompt = _rendering(images, limits, renderer.render, loaded, tools)
    _note(session, renderer, images, prompt.images)
    return prompt, False, reason


def answer_message(record: AssistantRecord) -> Message:
    """The assistant message as the client received it (what a later call echoes back)."""
    calls = tuple(ToolCall(name=c.name, arguments=c.arguments, id=c.id) for c in record.tool_calls)
    return Message(role="assistant", content=record.content, tool_calls=calls,
                   reasoning_content=record.reasoning_content)


def _extends(prefix: Sequence[Message], messages: Sequence[Message]) -> bool:
    """`messages` continue `prefix` (more messages, the same ones first; assistant messages as echoed)."""
    return len(prefix) < len(messages) and all(
        _same_assistant(a, b) if a.role == b.role == "assistant" else a == b
        for a, b in zip(prefix, messages, strict=False))


def _same_assistant(ours: Message, theirs: Message) -> bool:
    """An echoed assistant message is ours when its text and tool calls (name, parsed arguments) are;
    call ids and a dropped reasoning_content are not compared (harnesses rewrite or drop them)."""
    if (ours.text or "") != (theirs.text or ""):
        return False
    if theirs.reasoning_content is not None and theirs.reasoning_content != ours.reasoning_content:
        return False
    try:
        return [(c.name, c.arguments_dict()) for c in ours.tool_calls] == [
            (c.name, c.arguments_dict()) for c in theirs.tool_calls]
    except ValueError:
        return False


def _loaded(messages: Sequence[Message], limits: ImageLimits) -> tuple[list[Message], list[tuple[Any, Any]]]:
    """The messages with each image read as its encoded bytes (under `limits`; not decoded: the
    renderer's store decodes each once), and (source, bytes) per image in order."""
    out, images = [], []
    for message in messages:
        if not message.images:
            out.append(message)
            continue
        parts = []
        for part in message.parts:
            if isinstance(part, ImagePart):
                data = _encoded(part.image, limits)
                images.append((part.image, data))
                part = ImagePart(data)
            parts.append(part)
        out.append(replace(message, content=tuple(parts)))
    return out, images


def _encoded(source: ImageSource, limits: ImageLimits) -> ImageSource:
    """The bytes a data URL, URL, path or bytes source holds; a PIL image (the Python API) as it is."""
    if isinstance(source, (str, bytes, bytearray, memoryview, os.PathLike)):
        return read_source(source, limits)
    return source


def _rendering(images: Sequence[tuple[Any, Any]], limits: ImageLimits, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` (a render or a bridge); an image it cannot decode is named as the client gave it
    (data URL, path, URL), not as the bytes it was handed (found by decoding them again: errors only)."""
    try:
        return fn(*args)
    except ImageError:
        named = _decode_error(images, limits)
        if named is None:
            raise
        raise named from None


def _decode_error(images: Sequence[tuple[Any, Any]], limits: ImageLimits) -> ImageError | None:
    for source, data in images:
        if isinstance(data, bytes):
            what = ("data URL" if source[:5].lower() == "data:" else source[:100]) if isinstance(source, str) \
                else "image bytes"
            try:
                decode_image(data, limits, what=what)
            except ImageError as exc:
                return exc
    return None


def _note(session: Session, renderer: Renderer, images: Sequence[tuple[Any, Any]], refs: Sequence[Any]) -> None:
    """Record the id of each rendered image (by its source) and, until it is written, its bytes."""
    if renderer.feature_store is None:
        return
    if len(images) != len(refs):
        raise RenderError(f"{len(images)} images in the messages but {len(refs)} in the prompt")
    for (source, data), ref in zip(images, refs, strict=True):
        if isinstance(source, str):
            session.image_ids.setdefault(source, ref.id)
        if ref.id not in session.written_images:
            session.originals.setdefault(ref.id, data)


@contextlib.contextmanager
def turn_lease(store: FeatureStore | None) -> Iterator[PinLease | None]:
    """One call's pin lease (None without a store), for `next_prompt`: what the store hands the render
    stays in it until the block ends (the request has returned, the step is written), whatever happens."""
    if store is None:
        yield None
        return
    with store.lease() as lease:
        yield lease


def reload_from(session: Session, run_dir: Path) -> Callable[[str], ImageSource]:
    """Where the feature store recomputes an evicted image of the session (`FeatureStore.reloadable`):
    this call's bytes, else the original archived in the run directory (by path: its encoded bytes are
    read again, so content_parts can still send the client's own file)."""
    def reload(image_id: str) -> ImageSource:
        found = session.originals.get(image_id)
        if found is not None:
            return found
        if image_id not in session.written_images:
            raise UnknownImageError(f"image {image_id[:12]} is not one of session {session.key!r}'s")
        try:
            return RunReader(run_dir).original_path(image_id)
        except StoreError as exc:
            raise UnknownImageError(f"image {image_id[:12]}: {exc}") from None

    return reload
