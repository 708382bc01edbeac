"""`dataset`: prompts from data rows, answers scored by a reward function given by import path.

`rollwire rollout --env dataset --env-args '{"path": "rows.jsonl", "reward": "pkg.mod:fn"}'`.
Prompt k of a run with `--seed 0` is row k (rows wrap around; another seed starts elsewhere);
every sample of a GRPO group gets the same row. The reward function is called with the keyword
arguments its signature names, out of: `completion` (the messages since the prompt, OpenAI
format), `response` (the last assistant text), `answer`, `prompt` (the prompt messages), `info`
(the row's `info` column), `row`, and `turn` (1-based); it returns a number (or a bool), sync
or async. With `max_turns` > 1, an answer scoring under `success` gets feedback (a `feedback`
function's text, or "That is not correct. Try again.") and another turn; the rollout's reward
is the score of its last answer. The data's hash goes into the run manifest: a resume after the
file changed is refused.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from rollwire.errors import DatasetError, EnvSpecError
from rollwire.images import ImageLimits
from rollwire.messages import Message, message_to_dict
from rollwire.rollout.env import EnvStep, Observation, import_object
from rollwire.rollout.envs.rows import Prompt, data_fingerprint, load_rows, row_prompt

FEEDBACK = "That is not correct. Try again."
REWARD_ARGS = ("completion", "response", "answer", "prompt", "info", "row", "turn")


def exact_match(response: str, answer: Any) -> float:
    """1.0 when the response, stripped and case-folded, is the answer."""
    return float(response.strip().casefold() == str(answer).strip().casefold())


def contains_answer(response: str, answer: Any) -> float:
    """1.0 when the answer appears in the response (case-folded)."""
    return float(str(answer).strip().casefold() in response.casefold())


class DatasetEnv:
    """One row per prompt; single-turn by default, feedback turns up to `max_turns`."""

    name = "dataset"

    def __init__(
        self,
        path: str | None = None,
        *,
        rows: Sequence[Mapping[str, Any]] | None = None,
        reward: str | Callable[..., Any] = "rollwire.rollout.envs.dataset:exact_match",
        split: str = "train",
        max_turns: int = 1,
        success: float = 1.0,
        feedback: str | Callable[..., Any] | None = None,
        system_prompt: str | None = None,
        prompt_key: str | None = None,
        answer_key: str = "answer",
        images_key: str | None = None,
        image_root: str | None = None,
        allow_remote_images: bool = False,
    ) -> None:
        if (path is None) == (rows is None):
            raise DatasetError("the dataset environment needs a path or rows (one of them)")
        if max_turns < 1:
            raise DatasetError(f"max_turns must be at least 1, got {max_turns}")
        loaded = load_rows(path, split=split) if path is not None else rows
        assert loaded is not None
        self.rows: Sequence[Mapping[str, Any]] = loaded
        # What the run manifest records, so a resume after the data changed is refused.
        self.fingerprint = data_fingerprint(path, loaded) if path is not None else None
        if len(self.rows) == 0:
            raise DatasetError("the dataset has no rows")
        self.reward_fn = _function(reward, "reward")
        self.feedback_fn = _function(feedback, "feedback") if feedback is not None else None
        self.max_turns, self.success, self.system_prompt = max_turns, success, system_prompt
        self.prompt_key, self.answer_key, self.images_key = prompt_key, answer_key, images_key
        root = None if path is None or path.startswith("hf:") else _folder(path)
        roots = tuple(r for r in (root, image_root) if r is not None)
        self.root = image_root or root
        self.limits = ImageLimits(allow_remote=allow_remote_images, allowed_roots=roots or None)
        self._prompt: Prompt | None = None
        self._row: Mapping[str, Any] = {}
        self._completion: list[dict[str, Any]] = []

    async def reset(self, seed: int) -> Observation:
        index = seed % len(self.rows)
        self._row = self.rows[index]
        prompt = await asyncio.to_thread(functools.partial(
            row_prompt, self._row, index, limits=self.limits, root=self.root, prompt_key=self.prompt_key,
            answer_key=self.answer_key, images_key=self.images_key, system_prompt=self.system_prompt))
        self._prompt, self._completion = prompt, []
        info: dict[str, Any] = {"row": index, "answer": prompt.answer}
        if prompt.info:
            info["info"] = prompt.info
        return Observation(messages=prompt.messages, info=info)

    async def step(self, message: Message) -> EnvStep:
        assert self._prompt is not None, "reset first"
        self._completion.append(message_to_dict(message))
        turn = sum(m["role"] == "assistant" for m in self._completion)
        args = {"completion": list(self._completion), "response": message.text, "answer": self._prompt.answer,
                "prompt": self._prompt.messages, "info": self._prompt.info, "row": self._row, "turn": turn}
        score = await _call(self.reward_fn, args)
        if isinstance(score, np.generic):
            score = score.item()
        if not isinstance(score, (int, float)):  # bools count (a check passed or not)
            raise DatasetError(f"the reward function returned {type(score).__name__} {score!r}, not a number")
        score = float(score)
        info = {"turn": turn, "score": score}
        if score >= self.success or turn >= self.max_turns:
            return EnvStep(reward=score, done=True, info=info)
        text = await _call(self.feedback_fn, args) if self.feedback_fn is not None else FEEDBACK
        if text is None:
            return EnvStep(reward=score, done=True, info=info)
        reply = {"role": "user", "content": str(text)}
        self._completion.append(reply)
        return EnvStep(messages=[reply], info=info)


def _function(spec: str | Callable[..., Any], what: str) -> Callable[..., Any]:
    """The function a spec names, checked to ask only for arguments the environment gives."""
    if not callable(spec) and not (isinstance(spec, str) and ":" in spec):
        raise EnvSpecError(f"{what} must be an import path package.module:function, got {spec!r}")
    fn = spec if callable(spec) else import_object(spec, f"{what} function")
    try:
        params = inspect.signature(fn).parameters.values()
    except ValueError:  # no signature (a builtin): it gets every argument
        return fn
    unknown = [p.name for p in params if p.name not in REWARD_ARGS and p.default is p.empty
               and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    if unknown:
        raise EnvSpecError(f"{what} function {getattr(fn, '__name__', spec)} asks for {', '.join(unknown)}; "
                           f"it may ask for {', '.join(REWARD_ARGS)}")
    return fn


async def _call(fn: Callable[..., Any], args: Mapping[str, Any]) -> Any:
    """`fn` with the arguments its signature names (all of them when it takes **kwargs); a sync
    function runs in a worker thread (a slow verifier does not hold up the other rollouts)."""
    try:
        params = inspect.signature(fn).parameters
        wanted = dict(args) if any(p.kind is p.VAR_KEYWORD for p in params.values()) else {
            n: args[n] for n in params if n in args}
    except ValueError:
        wanted = dict(args)
    if inspect.iscoroutinefunction(fn):
        return await fn(**wanted)
    result = await asyncio.to_thread(functools.partial(fn, **wanted))
    return await result if inspect.isawaitable(result) else result


def _folder(path: str) -> str:
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
