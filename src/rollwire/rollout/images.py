"""A rollout's images: ids, not pixels. Each image is archived when first seen and reloaded from there.

With an `ImageArchive` (a run's blob store: `rollwire.store.RunWriter`), the rollout keeps no image
of its own: once an image of the conversation has an id it is archived (original + features) and
its part in the conversation becomes an `ArchivedImage` (an id and a path). Pixels then live only in
the bounded feature store; a request pins its new images there (the others are reloadable), and
one the store evicted is recomputed from the archive when an engine needs it (the recomputed id
must equal the original one). Without
an archive (library use, no run directory) the rollout holds the originals it was given instead,
and hands them to the caller in `RolloutResult.originals`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

from rollwire.errors import RenderError, RollwireError, UnknownImageError
from rollwire.features import FeatureStore, ImageFeatures, PinLease
from rollwire.messages import ImagePart, ImageSource, Message
from rollwire.render.types import RenderedTokens


@runtime_checkable
class ImageArchive(Protocol):
    """Where images go when first seen, so no rollout holds them (`RunWriter` is one)."""

    def archive_image(self, image_id: str, image: ImageSource, features: ImageFeatures) -> str:
        """Store the original and its features under `image_id` (idempotent); the original's path.
        `restore_image` works at once; the blobs may become durable later, before any rollout
        using them is committed (`RunWriter` syncs them in the background, off the rollout's turn)."""
        ...

    def restore_image(self, image_id: str) -> ImageSource:
        """The archived original, decoded."""
        ...


class ArchivedImage(os.PathLike[str]):
    """An image of the conversation that is archived: its id and where its original is."""

    __slots__ = ("id", "path")

    def __init__(self, image_id: str, path: str) -> None:
        self.id = image_id
        self.path = path

    def __fspath__(self) -> str:
        return self.path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ArchivedImage) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"ArchivedImage({self.id[:12]})"


class RolloutImages:
    """Which id each image of one rollout has, and where to reload it from."""

    def __init__(self, store: FeatureStore | None, archive: ImageArchive | None = None) -> None:
        self.store = store
        self.archive = archive
        # Without an archive: image id -> the original (the environment's object, not a copy).
        self.originals: dict[str, Any] = {}
        self._archived: dict[str, ArchivedImage] = {}
        self._archiving: dict[str, Any] = {}  # image id -> its original while it is being archived
        self._ids: dict[int, tuple[Any, str]] = {}  # id() of a held original -> (it, its image id)

    def note(self, conversation: Sequence[Message], prompt: RenderedTokens) -> list[Message]:
        """Learn the ids of the prompt's images (image parts and refs come in the same order) and
        archive the new ones; returns the conversation with archived parts (no originals in it).
        Blocking (it encodes and writes images): run it off the event loop."""
        parts = [p for m in conversation for p in m.images]
        if len(parts) != len(prompt.images):
            raise RenderError(f"{len(parts)} images in the conversation but {len(prompt.images)} in the prompt")
        swap: dict[int, ArchivedImage] = {}
        for part, ref in zip(parts, prompt.images, strict=True):
            if isinstance(part.image, ArchivedImage):
                if part.image.id != ref.id:
                    raise RenderError(f"archived image {part.image.id[:12]} rendered as {ref.id[:12]}")
                continue
            if self.archive is None or self.store is None:
                self._hold(part.image, ref.id)
                continue
            archived = self._archived.get(ref.id)
            if archived is None:
                self._archiving[ref.id] = part.image
                try:
                    features = self._features(ref.id, part.image)
                    path = self.archive.archive_image(ref.id, part.image, features)
                    archived = self._archived[ref.id] = ArchivedImage(ref.id, path)
                finally:
                    del self._archiving[ref.id]
            swap[id(part)] = archived
        return _replace_parts(conversation, swap) if swap else list(conversation)

    def _hold(self, image: Any, image_id: str) -> None:
        self._ids.setdefault(id(image), (image, image_id))
        self.originals.setdefault(image_id, image)

    def _features(self, image_id: str, image: ImageSource) -> ImageFeatures:
        """The stored features of a just-rendered image, or (the store evicted them already) the
        same features computed again from it."""
        assert self.store is not None
        with contextlib.suppress(KeyError):
            return self.store.get(image_id)
        features = self.store.get_or_process(image)
        if features.id != image_id:
            raise RenderError(f"image {image_id[:12]} hashed to {features.id[:12]} when processed again")
        return features

    def reload(self, image_id: str) -> ImageSource:
        """The source to recompute an evicted image from (the feature store's pin calls it);
        `UnknownImageError` for an image this rollout has not seen (yet)."""
        if image_id in self._archived:
            assert self.archive is not None
            return self.archive.restore_image(image_id)
        try:
            return self.originals[image_id] if image_id in self.originals else self._archiving[image_id]
        except KeyError:
            raise UnknownImageError(f"image {image_id[:12]} is neither archived nor held by this rollout") from None

    @contextlib.contextmanager
    def pinned(self, prompt: RenderedTokens, lease: PinLease | None = None) -> Iterator[None]:
        """For the block (archiving and sending this turn): the prompt's images this rollout has
        not archived yet (just rendered, to be sent) stay in the store; all of them are reloadable,
        so an earlier image the server holds costs no memory, and one an engine needs is recomputed.
        `lease` (the one the render collected into, holding them since the store handed them out)
        keeps only the prompt's pins and is released when the block ends, whatever happens."""
        if self.store is None:
            yield
            return
        new = [i for i in prompt.image_ids if i not in self._archived]
        with contextlib.ExitStack() as stack:
            if lease is None:
                stack.enter_context(self.store.pinned(new))
            else:
                stack.callback(lease.release)
                lease.pin(new)  # a renderer that did not go through the store: pinned from now on
                lease.retain(prompt.image_ids)  # what a declined bridge pinned and the render did not use
            stack.enter_context(self.store.reloadable(prompt.image_ids, self.reload))
            yield

    def materialize(self, conversation: Sequence[Message]) -> list[Message]:
        """The conversation with archived images decoded again, for a full render (the renderer
        reads image sources under the user's path limits, which do not cover the run directory)."""
        swap = {id(p): ImagePart(self.reload(p.image.id)) for m in conversation for p in m.images
                if isinstance(p.image, ArchivedImage)}
        return _replace_parts(conversation, swap) if swap else list(conversation)

    def adopt(self, conversation: Sequence[Message]) -> list[Message]:
        """Images of a rewritten history that this rollout archived already become archived parts
        again (so the earlier turns it still shares are found as its prefix)."""
        if not self._archived or self.store is None:
            return list(conversation)
        swap: dict[int, ArchivedImage] = {}
        for message in conversation:
            for part in message.images:
                if not isinstance(part.image, ArchivedImage):
                    image_id = self._id_of(part.image)
                    if image_id in self._archived:
                        swap[id(part)] = self._archived[image_id]
        return _replace_parts(conversation, swap) if swap else list(conversation)

    def _id_of(self, image: Any) -> str | None:
        assert self.store is not None
        try:
            return self.store.image_id(image)
        except RollwireError:
            return None

    def id_for(self, image: Any) -> str | None:
        """The id of an image of the final conversation (None when it cannot be read)."""
        if isinstance(image, ArchivedImage):
            return image.id
        known = self._ids.get(id(image))
        if known is not None and known[0] is image:
            return known[1]
        if self.store is None:
            return None
        return self._id_of(image)


def _replace_parts(conversation: Sequence[Message], swap: dict[int, Any]) -> list[Message]:
    """New messages where the image parts in `swap` (by id() of the part) get their new image
    (inputs are never mutated); messages with nothing to swap are kept as they are."""
    out = []
    for message in conversation:
        if isinstance(message.content, tuple) and any(id(p) in swap for p in message.content):
            content = tuple(_swapped(p, swap[id(p)]) if id(p) in swap else p for p in message.content)
            message = dataclasses.replace(message, content=content)
        out.append(message)
    return out


def _swapped(part: Any, image: Any) -> ImagePart:
    return image if isinstance(image, ImagePart) else ImagePart(image)
