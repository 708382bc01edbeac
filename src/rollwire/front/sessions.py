"""Sessions of the OpenAI front: one trajectory each, prompts bridged from the session's last turn.

An OpenAI client resends the whole conversation on every call. When it extends a turn of the
session (the same messages through an assistant message the front sampled, as the client saw
it, then only new ones), the next prompt is that turn's prompt + its completion ids + the new
messages rendered (`Renderer.bridge`), so sampled tokens are never re-rendered; otherwise (the
history was edited, the tools changed, the bridge declined) the conversation is rendered in
full and the reason recorded on the step and counted in the trajectory's metrics.

Images are decoded only for the messages that get rendered (the new ones when bridging), each
once per call, with the front's `ImageLimits`.
"""

from __future__ import annotations

import contextlib
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import msgspec

from rollwire.errors import RenderError
from rollwire.features import FeatureStore, ImageFeatures
from rollwire.images import ImageLimits, load_image
from rollwire.messages import ImagePart, Message, ToolCall, message_to_dict
from rollwire.render.types import RenderedTokens, Renderer
from rollwire.rollout.types import AssistantRecord, Step, Trajectory

__all__ = ["ENV_NAME", "Session", "answer_message", "next_prompt", "pinned_features"]

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
    # New images until the trajectory is written (then their blobs are on disk): decoded originals
    # and features by id, so an idle session holds no pixels.
    originals: dict[str, Any] = field(default_factory=dict)
    features: dict[str, ImageFeatures] = field(default_factory=dict)
    written_images: set[str] = field(default_factory=set)  # ids whose blobs are in the run directory
    metrics: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    ended: bool = False

    def written(self) -> None:
        """The trajectory and its images are on disk: let go of the new images' pixels."""
        self.written_images.update(self.features)
        self.originals.clear()
        self.features.clear()

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
    limits: ImageLimits,
) -> tuple[RenderedTokens, bool, str | None]:
    """(prompt, bridged, why a full render) for `messages`: bridged from the latest turn they extend."""
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
            result = renderer.bridge(base.prompt, base.completion_ids, loaded)
            if result.tokens is not None:
                session.metrics["bridge_successes"] += 1
                _note(session, renderer, new, images, result.tokens.images[len(base.prompt.images):])
                return result.tokens, True, None
            reason = result.reason or "bridge declined"
        session.metrics[f"full_render:{reason}"] += 1
    loaded, images = _loaded(messages, limits)
    prompt = renderer.render(loaded, tools)
    _note(session, renderer, messages, images, prompt.images)
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
    """The messages with each image decoded (under `limits`), and (source, image) per image in order."""
    out, images = [], []
    for message in messages:
        if not message.images:
            out.append(message)
            continue
        parts = []
        for part in message.parts:
            if isinstance(part, ImagePart):
                image = load_image(part.image, limits)
                images.append((part.image, image))
                part = ImagePart(image)
            parts.append(part)
        out.append(replace(message, content=tuple(parts)))
    return out, images


def _note(session: Session, renderer: Renderer, messages: Sequence[Message], images: Sequence[tuple[Any, Any]],
          refs: Sequence[Any]) -> None:
    """Record the id of each rendered image (its source, its decoded original, its features)."""
    store = renderer.feature_store
    if store is None:
        return
    if len(images) != len(refs):
        raise RenderError(f"{len(images)} images in the messages but {len(refs)} in the prompt")
    for (source, image), ref in zip(images, refs, strict=True):
        if isinstance(source, str):
            session.image_ids.setdefault(source, ref.id)
        if ref.id not in session.features and ref.id not in session.written_images:
            session.originals[ref.id] = image
            session.features[ref.id] = _features(store, ref.id, image)


def _features(store: FeatureStore, image_id: str, image: Any) -> ImageFeatures:
    try:
        return store.get(image_id)
    except KeyError:  # evicted under pressure since the render: the same features again
        return store.get_or_process(image)


@contextlib.contextmanager
def pinned_features(store: FeatureStore | None, prompt: RenderedTokens,
                    lookup: Callable[[str], ImageFeatures]) -> Iterator[None]:
    """Pin the prompt's images in `store` for the block (an in-flight request needs them), putting
    back any it evicted since they were rendered (`lookup` finds them: the session's, the run's blobs)."""
    if store is None:
        yield
        return
    with store.pinned(prompt.image_ids):
        for image_id in dict.fromkeys(prompt.image_ids):
            if image_id not in store:
                store.put(lookup(image_id))
        yield
