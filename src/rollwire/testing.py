"""Test helpers: `ScriptedEngine`, an engine that answers with scripted text instead of a model.

Random tiny weights never call a tool, so an environment's tool path cannot be tested against
them. `ScriptedEngine` plays the policy: each turn's completion is scripted text (or an
assistant message, or a function of the request) rendered to token ids by the family's own
tokenizer and template, ended with the stop token as a real model ends it, with plausible
logprobs. Everything downstream (parse, bridge, placeholders, store) runs for real.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

from rollwire.engines.types import Completion, FinishReason, GenerateRequest, GenerateResult, Timings
from rollwire.errors import EngineError
from rollwire.messages import Message, parse_message
from rollwire.render.types import Renderer

# One turn's scripted answer: the completion's text, an assistant message (rendered as the
# family's template writes it, tool calls included), or an exception the engine raises.
ScriptItem: TypeAlias = "str | Message | Mapping[str, Any] | BaseException"
ScriptFn: TypeAlias = Callable[[GenerateRequest, int], "str | Message | Mapping[str, Any] | BaseException"]

_PROBE: dict[str, Any] = {"role": "user", "content": "."}


class ScriptedEngine:
    """An `Engine` whose completions are scripted, turn by turn.

    `script` is a list (item k answers turn k of each rollout; rollouts are told apart by the
    request id `run_rollout` gives, `<trajectory id>-<turn>`) or a function of
    `(request, turn)`. A text completion is tokenized as the model would have sampled it and
    gets the family's stop token appended; it is cut at the first stop token and at
    `max_tokens` (then `finish_reason="length"`), as a real engine would. `requests` keeps
    every request, for assertions.
    """

    def __init__(self, renderer: Renderer, script: Sequence[ScriptItem] | ScriptFn, *,
                 logprob_seed: int = 0) -> None:
        tokenizer = getattr(renderer, "tokenizer", None)
        if tokenizer is None or not hasattr(tokenizer, "encode_ids"):
            raise EngineError(f"the {renderer.family} renderer has no tokenizer to script completions with")
        if not renderer.stop_token_ids:
            raise EngineError(f"the {renderer.family} renderer has no stop token")
        self.renderer = renderer
        self.script = script if callable(script) else list(script)
        self.logprob_seed = logprob_seed
        self.requests: list[GenerateRequest] = []
        self._turns: Counter[str] = Counter()
        self._tokenizer = tokenizer

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        self.requests.append(request)
        rollout = (request.request_id or "").rpartition("-")[0] or (request.request_id or "")
        turn = self._turns[rollout]
        self._turns[rollout] += 1
        item = self._item(request, turn)
        if isinstance(item, BaseException):
            raise item
        ids = self.completion_ids(item)
        finish: FinishReason = "stop"
        if len(ids) > request.sampling.max_tokens:
            ids, finish = ids[: request.sampling.max_tokens], "length"
        rng = random.Random(f"{self.logprob_seed}/{request.request_id}/{turn}")
        logprobs = [math.log(rng.uniform(0.05, 0.99)) for _ in ids]
        stop_reason = ids[-1] if finish == "stop" else None
        return GenerateResult(completions=[Completion(token_ids=ids, logprobs=logprobs, finish_reason=finish,
                                                      stop_reason=stop_reason)],
                              timings=Timings(total_s=0.0))

    def completion_ids(self, item: str | Message | Mapping[str, Any]) -> list[int]:
        """The token ids a model writing `item` samples, through the first stop token."""
        stops = set(self.renderer.stop_token_ids)
        if isinstance(item, str):
            ids = [*self._tokenizer.encode_ids(item), self.renderer.stop_token_ids[0]]
        else:
            ids = list(self._rendered(parse_message(item)))
        end = next((k for k, t in enumerate(ids) if t in stops), None)
        if end is None:
            raise EngineError(f"the scripted completion {item!r} has no stop token after rendering")
        return ids[: end + 1]

    def _rendered(self, message: Message) -> Sequence[int]:
        """The assistant message as the template writes it after a generation prompt."""
        if message.role != "assistant":
            raise EngineError(f"a scripted message must be an assistant message, got role {message.role!r}")
        prompt = self.renderer.render([_PROBE]).token_ids
        full = self.renderer.render([_PROBE, message], add_generation_prompt=False).token_ids
        if full[: len(prompt)] != prompt:
            raise EngineError(f"the {self.renderer.family} template does not write an assistant message after "
                              "its generation prompt; script the completion as text instead")
        return full[len(prompt):]

    def _item(self, request: GenerateRequest, turn: int) -> Any:
        if callable(self.script):
            return self.script(request, turn)
        if turn >= len(self.script):
            return EngineError(f"the script has {len(self.script)} turns; turn {turn} was asked for "
                               f"({request.request_id})")
        return self.script[turn]

    async def close(self) -> None:
        pass
