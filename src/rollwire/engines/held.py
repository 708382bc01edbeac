"""Which images one server holds, per server epoch, and the sends in flight that will make it hold more.

vLLM keeps each image it was sent in its multimodal processor cache, under the id the client gave
(`mm_hashes`); a later request may send that id alone (a null `kwargs_data` item). What the client
may assume the server holds is tied to an *epoch*, and every epoch starts empty:

- vLLM wipes the cache on every pause/resume (a weight update) and sleep. A weight update is seen
  in the responses: each choice carries `weight_versions` (spans of output tokens and the weights
  that sampled them); a version not seen before starts a new epoch. A weight-update hook that knows
  better calls `new_epoch(reason)` itself (`VLLMEngine.new_epoch`).
- A choice that finishes with `abort` (vLLM aborts in-flight requests when it pauses) starts one.
- A restart: vLLM's `/version` has no start time, so what is observable is the connection: a
  request that could not reach the server (refused, reset) and a later answer start a new epoch.

An image counts as held only after a 200 for a request that carried its pixels, in the same
epoch. Concurrent requests for an image nobody holds are deduplicated: the first carries the
pixels, the others wait for it and then go by id; if the carrier fails, a waiter carries them.
Waiting never holds a claim, so requests sharing images cannot wait on each other in a cycle.
The server's cache is an LRU bounded by bytes (`--mm-processor-cache-gb`, 4 GiB by default), so
the set here is bounded likewise; a 500 on an id-only request (its cache evicted the image anyway)
forgets those ids and the client re-sends in full.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rollwire.features import FeatureStore
    from rollwire.render.types import ImageRef

DEFAULT_SERVER_CACHE_BYTES = 4 * 2**30  # vLLM's --mm-processor-cache-gb default


@dataclass(frozen=True)
class Plan:
    """One request's images: those it sends by id alone and those whose pixels it carries."""

    epoch: int
    by_id: frozenset[str]
    carry: frozenset[str]
    _claims: Mapping[str, asyncio.Future[None]] = field(default_factory=dict, repr=False)


@dataclass
class HeldStats:
    epochs: int = 0  # epochs started after the first
    waits: int = 0  # times a request waited for another to carry an image
    evicted: int = 0  # id-only images the server no longer held (HTTP 500)
    last_reason: str = ""


class HeldImages:
    """The images one server holds in the current epoch, and the carriers in flight (asyncio only)."""

    def __init__(self, *, enabled: bool = True, max_bytes: int = DEFAULT_SERVER_CACHE_BYTES) -> None:
        self.enabled = enabled
        self.disabled_reason = "" if enabled else "images_by_id=False"
        self.max_bytes = max_bytes
        self.epoch = 0
        self.weight_version: str | None = None
        self.stats = HeldStats()
        self._held: OrderedDict[str, int] = OrderedDict()  # id -> bytes the server keeps for it, LRU
        self._bytes = 0
        self._retired: set[str] = set()  # weight versions a change left behind
        self._claims: dict[str, asyncio.Future[None]] = {}  # id -> the carrier's completion
        self._unreachable = False  # a request could not reach the server since the last answer
        self.restarts = 0  # times the server answered again after it could not be reached

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._held

    def __len__(self) -> int:
        return len(self._held)

    def disable(self, reason: str) -> None:
        """Send every image with its pixels from now on (e.g. the server has no image cache)."""
        self.enabled, self.disabled_reason = False, reason
        self._forget_all()

    def new_epoch(self, reason: str) -> None:
        """The server holds nothing any more (its cache was wiped); carriers in flight do not count."""
        self.epoch += 1
        self.stats.epochs += 1
        self.stats.last_reason = reason
        self.weight_version = None  # learnt again from the next answer
        self._forget_all()

    def _forget_all(self) -> None:
        self._held.clear()
        self._bytes = 0

    async def plan(self, image_ids: Iterable[str]) -> Plan:
        """Wait until no other request carries one of these images, then claim the ones the server
        does not hold. The caller must `settle` the plan (in a `finally`)."""
        ids = list(dict.fromkeys(image_ids))
        if not self.enabled or not ids:
            return Plan(self.epoch, frozenset(), frozenset(ids))
        while True:
            pending = {self._claims[i] for i in ids if i not in self._held and i in self._claims}
            if not pending:
                break
            self.stats.waits += 1
            await asyncio.wait(pending)  # a failed carrier leaves its images unclaimed: re-plan
        by_id = frozenset(i for i in ids if i in self._held)
        for image_id in by_id:
            self._held.move_to_end(image_id)
        carry = frozenset(i for i in ids if i not in by_id)
        loop = asyncio.get_running_loop()
        claims = {i: loop.create_future() for i in carry}
        self._claims.update(claims)
        return Plan(self.epoch, by_id, carry, claims)

    def settle(self, plan: Plan, *, ok: bool, sizes: Mapping[str, int] | None = None,
               weight_versions: Sequence[str] = (), aborted: bool = False,
               carried: Iterable[str] | None = None) -> None:
        """The request's outcome: on a 200 (`ok`) in the plan's epoch its carried images are held.

        `carried` is what the answered attempt really carried (the plan's carry, plus any id-only
        image it re-sent in full after a miss; default: the plan's). `weight_versions` are the
        versions the response names (in order), `aborted` whether a choice finished with `abort`;
        either may start a new epoch (see the module docstring).
        """
        try:
            epoch = plan.epoch
            if ok:
                if self._unreachable:  # the first answer since: what it carried reached the server as it is now
                    self._unreachable, self.restarts = False, self.restarts + 1
                    self.new_epoch("the server could not be reached and answered again (a restart?)")
                    epoch = self.epoch
                ok = self._observe(weight_versions, aborted)
            if ok and self.enabled and epoch == self.epoch:
                for image_id in plan.carry if carried is None else set(carried):
                    self._hold(image_id, (sizes or {}).get(image_id, 0))
        finally:
            for image_id, claim in plan._claims.items():
                if self._claims.get(image_id) is claim:
                    del self._claims[image_id]
                if not claim.done():
                    claim.set_result(None)

    def unreachable(self) -> None:
        """A request could not reach the server: when it answers again, it may have restarted."""
        self._unreachable = True

    def evicted(self, image_ids: Iterable[str]) -> None:
        """The server could not serve these ids alone (HTTP 500): it no longer holds them."""
        for image_id in image_ids:
            size = self._held.pop(image_id, None)
            if size is not None:
                self._bytes -= size
                self.stats.evicted += 1

    def _observe(self, versions: Sequence[str], aborted: bool) -> bool:
        """Start a new epoch when the response shows one began; whether the request's carried
        images count as held (False when they may have been sent before the wipe)."""
        if aborted:
            self.new_epoch("a request was aborted (vLLM aborts in-flight requests when it pauses)")
            return False
        if not versions:
            return True
        if any(v in self._retired for v in versions):
            return False  # sampled (in part) by weights from before a wipe: a late answer
        if self.weight_version is None:  # the first version this epoch sees
            self.weight_version = versions[0]
        if all(v == self.weight_version for v in versions):
            return True
        old, new = self.weight_version, versions[-1]
        self._retired.add(old)
        self.new_epoch(f"weight version {old!r} -> {new!r} (vLLM wipes its image cache on a weight update)")
        self.weight_version = new
        return False  # it spans the change: what it carried went before the wipe

    def _hold(self, image_id: str, size: int) -> None:
        old = self._held.pop(image_id, None)
        if old is not None:
            self._bytes -= old
        self._held[image_id] = size
        self._bytes += size
        while self._bytes > self.max_bytes and len(self._held) > 1:
            _, dropped = self._held.popitem(last=False)
            self._bytes -= dropped


def weight_versions(payload: Any) -> list[str]:
    """The weight versions a generate response names (vLLM >= 0.3x: `choices[].weight_versions`,
    spans `{version, start, end}`, as dicts or structs), in order; [] when it names none."""
    out: list[str] = []
    choices = payload.get("choices") if isinstance(payload, dict) else getattr(payload, "choices", None)
    for choice in choices if isinstance(choices, list) else ():
        spans = choice.get("weight_versions") if isinstance(choice, dict) else getattr(choice, "weight_versions", None)
        for span in spans if isinstance(spans, list) else ():
            version = span.get("version") if isinstance(span, dict) else getattr(span, "version", None)
            if isinstance(version, str) and (not out or out[-1] != version):
                out.append(version[:200])
    return out


_ENGINE_LABEL = re.compile(r'^vllm:[A-Za-z_:]+\{[^}]*\bengine="([^"]*)"', re.MULTILINE)


def data_parallel_engines(metrics: str) -> int:
    """How many engines a vLLM server's Prometheus `/metrics` reports (one `engine` label value per
    data-parallel rank behind its internal load balancer; 1 when it names none)."""
    return max(1, len({m for m in _ENGINE_LABEL.findall(metrics[:4_000_000]) if m}))


def held_sizes(images: Sequence[ImageRef], store: FeatureStore | None, pixel_format: str | None) -> dict[str, int]:
    """Bytes a server's cache keeps per image (its pixels as sent), for the held set's bound."""
    itemsize = 1 if pixel_format in (None, "uint8") else (2 if pixel_format == "bfloat16" else 4)
    row = store.config.row_size if store is not None else 0
    return {ref.id: math.prod(ref.grid_thw) * row * itemsize for ref in images}
