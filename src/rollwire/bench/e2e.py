"""`rollwire bench e2e`: the same multi-turn image conversations against one CPU vLLM and the tiny
Qwen2-VL model, through rollwire and through verifiers 0.4.0's client path.

verifiers 0.4.0 sends multimodal prompts with renderers 0.1.12's `generate(process_multimodal=
False)`: the prompt bridged (or rendered) by its Qwen3-VL renderer with one pad per image, and
`content_parts` with every image of the conversation, as its data URL, on every turn. rollwire
runs the same conversations (the same JPEG data URLs) in both its modes: `features` (each image's
uint8 patches once, later turns by id) and `content_parts` (each image once, as the JPEG itself
where the server was checked to process it as rollwire does, else as the resized PNG; later turns
by uuid), and checks that the two give the same tokens and logprobs. All run their conversations
concurrently; request bytes are counted on the wire (rollwire's engine counts each body it sends;
verifiers' through httpx request hooks).
Needs `.venv-baselines` (scripts/setup_baselines.sh) for the verifiers side; without it, only
rollwire's side is measured and the table says so.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from functools import partial
from pathlib import Path
from typing import Any, cast

from rollwire.bench.images import encoded, photo
from rollwire.bench.instant import Pictures
from rollwire.bench.report import Report, Table
from rollwire.bench.vllm_server import start_server, stop_server

PORT = 8871
TURNS = 4  # the server script allows 4 images a prompt
CONVERSATIONS, QUICK_CONVERSATIONS = 8, 2
SIDE = 224
MAX_TOKENS = 12
QUESTION = "What changed?"


def _picture(conversation: int, turn: int) -> str:
    """The turn's picture as a JPEG data URL, as an environment hands it over (the same for every client)."""
    data = encoded(photo(SIDE, SIDE, seed=1000 * conversation + turn), "JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")


MODES = ("features", "content-parts")


async def rollwire_side(url: str, model_dir: Path, n: int, mode: str = "features") -> dict[str, Any]:
    from rollwire.engines.vllm import VLLMEngine
    from rollwire.render import create_renderer
    from rollwire.rollout import RolloutConfig, run_rollout

    config = RolloutConfig(max_turns=TURNS, max_tokens=MAX_TOKENS, temperature=0.0, max_total_tokens=1 << 22)

    async def run_rollouts(renderer: Any, envs: list[Pictures], turns: int, engine: Any) -> list[Any]:
        return await asyncio.gather(*(run_rollout(env, renderer, engine, config, seed=i, trajectory_id=f"r{i}")
                                      for i, env in enumerate(envs)))

    renderer: Any = create_renderer(model_dir)
    engine = VLLMEngine.for_renderer(url, renderer, model="qwen2_vl", wire=mode)
    try:
        warm = [Pictures(cast(Any, partial(_picture, 10_000)), TURNS)]  # its images are not reused
        await run_rollouts(renderer, warm, TURNS, engine)
        envs = [Pictures(cast(Any, partial(_picture, i)), TURNS) for i in range(n)]
        start = time.perf_counter()
        results = await run_rollouts(renderer, envs, TURNS, engine)
        seconds = time.perf_counter() - start
    finally:
        await engine.close()
    trajs = [r.trajectory for r in results]
    errors = [t.error.message for t in trajs if t.error]
    return {"seconds": seconds, "rollouts_s": n / seconds, "turns": sum(len(t.steps) for t in trajs),
            "bytes": int(sum(t.metrics.get("bytes_sent", 0) for t in trajs)), "failed": len(errors),
            "errors": errors[:1], "originals": engine.originals.verdicts(),
            "outputs": [[(s.completion_ids, s.completion_logprobs) for s in t.steps] for t in trajs]}


def _vllm_032_logprobs(original: Any) -> Any:
    """renderers 0.1.12 reads logprob entries as {"token": "token_id:N"} (older vLLM); vLLM 0.32 sends
    {"token_id": N}. This adapter gives it the shape it reads, changing nothing else."""

    def parse(choice: Any, completion_ids: list[int]) -> list[float]:
        content = (choice.get("logprobs") or {}).get("content")
        if isinstance(content, list):
            content = [{**e, "token": f"token_id:{e['token_id']}"} if isinstance(e, dict) and "token_id" in e
                       and "token" not in e else e for e in content]
            choice = {**choice, "logprobs": {**choice["logprobs"], "content": content}}
        result: list[float] = original(choice, completion_ids)
        return result

    return parse


async def verifiers_side(url: str, model_dir: Path, n: int) -> dict[str, Any]:
    import httpx
    import renderers
    import renderers.client as renderers_client
    from openai import AsyncOpenAI
    from renderers.client import generate
    from transformers import AutoProcessor, AutoTokenizer

    original = renderers_client._parse_completion_logprobs
    renderers_client._parse_completion_logprobs = _vllm_032_logprobs(original)

    sent = [0]

    async def count(request: httpx.Request) -> None:
        sent[0] += len(request.content)

    http = httpx.AsyncClient(event_hooks={"request": [count]}, timeout=600)
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", http_client=cast(Any, http))
    renderer = renderers.Qwen3VLRenderer(AutoTokenizer.from_pretrained(str(model_dir)),
                                         processor=AutoProcessor.from_pretrained(str(model_dir)))

    def user(i: int, turn: int) -> dict[str, Any]:
        return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _picture(i, turn)}},
                                            {"type": "text", "text": QUESTION}]}

    async def conversation(i: int) -> int:
        messages = [user(i, 0)]
        rendered = renderer.render(messages, add_generation_prompt=True, process_multimodal=False)
        prompt_ids, attribution = rendered.token_ids, rendered
        for turn in range(TURNS):
            result = await generate(client=client, renderer=renderer, messages=messages, model="qwen2_vl",
                                    prompt_ids=prompt_ids, prompt_attribution=attribution,
                                    sampling_params={"max_tokens": MAX_TOKENS, "temperature": 0.0},
                                    process_multimodal=False)
            if turn + 1 == TURNS:
                return turn + 1
            tail = [user(i, turn + 1)]
            messages += [{"role": "assistant", "content": result["content"] or ""}, *tail]
            bridged = renderer.bridge_to_next_turn(result["renderer_prompt_ids"], result["completion_ids"], tail,
                                                   process_multimodal=False)
            if bridged is None:
                bridged = renderer.render(messages, add_generation_prompt=True, process_multimodal=False)
            prompt_ids, attribution = bridged.token_ids, bridged
        return TURNS

    try:
        await conversation(10_000)  # warm-up
        sent[0] = 0
        start = time.perf_counter()
        outcomes = await asyncio.gather(*(conversation(i) for i in range(n)), return_exceptions=True)
        seconds = time.perf_counter() - start
    finally:
        await http.aclose()
        renderers_client._parse_completion_logprobs = original
    errors = [f"{type(o).__name__}: {o}" for o in outcomes if isinstance(o, BaseException)]
    return {"seconds": seconds, "rollouts_s": n / seconds, "turns": sum(o for o in outcomes if isinstance(o, int)),
            "bytes": sent[0], "failed": len(errors), "errors": errors[:1]}


def run(quick: bool = False, server: str | None = None) -> Report:
    from rollwire.tiny_model import ensure_tiny_model

    model_dir = ensure_tiny_model("qwen2_vl")
    n = QUICK_CONVERSATIONS if quick else CONVERSATIONS
    pid = None
    if server is None:
        pid = start_server(model_dir, "qwen2_vl", PORT, timeout=600,
                           env={"VLLM_HEALTH_TIMEOUT": os.environ.get("VLLM_HEALTH_TIMEOUT", "480")})
        server = f"http://127.0.0.1:{PORT}"
    try:
        ours_by_mode = {mode: asyncio.run(rollwire_side(server, model_dir, n, mode)) for mode in MODES}
        ours = ours_by_mode["features"]
        try:
            import renderers  # noqa: F401
            import verifiers

            theirs: dict[str, Any] | None = asyncio.run(verifiers_side(server, model_dir, n))
            why = f"verifiers {verifiers.__version__} / renderers 0.1.12 client"
        except ImportError as exc:
            theirs, why = None, f"verifiers 0.4.0 not importable ({exc}): only rollwire's side was measured"
    finally:
        if pid is not None:
            stop_server(pid)
    table = Table(["client", "conversations × turns", "seconds", "rollouts/s", "request bytes", "failed"])
    same = ours_by_mode["features"].pop("outputs") == ours_by_mode["content-parts"].pop("outputs")
    for mode, r in ours_by_mode.items():
        label = "features: each image's patches once" if mode == "features" else \
            "content_parts: each JPEG once, then by uuid"
        table.add(f"rollwire ({label})", f"{n} × {TURNS}", f"{r['seconds']:.2f}", f"{r['rollouts_s']:.2f}",
                  f"{r['bytes']:,}", r["failed"])
    if theirs is not None:
        table.add("verifiers 0.4.0 (content_parts, every image every turn)", f"{n} × {TURNS}",
                  f"{theirs['seconds']:.2f}", f"{theirs['rollouts_s']:.2f}", f"{theirs['bytes']:,}", theirs["failed"])
    summary = "; ".join(f"rollwire {mode} {r['rollouts_s']:.2f} rollouts/s, {r['bytes']:,} request bytes"
                        for mode, r in ours_by_mode.items())
    summary += f" (tokens and logprobs {'identical' if same else 'DIFFERENT'} in the two modes)"
    if theirs is not None:
        summary += (f"; verifiers 0.4.0 {theirs['rollouts_s']:.2f} rollouts/s, {theirs['bytes']:,} bytes "
                    f"({theirs['bytes'] / max(ours['bytes'], 1):.2f}× rollwire features', "
                    f"{theirs['bytes'] / max(ours_by_mode['content-parts']['bytes'], 1):.2f}× rollwire content_parts')")
    return Report(
        name="e2e", command="rollwire bench e2e" + (" --quick" if quick else "") + (f" --server {server}" if pid is None
                                                                                  else ""), summary=summary + ".",
        tables=[table],
        notes=[f"{n} conversations of {TURNS} turns, a new {SIDE}² photo-like picture per turn (a JPEG data URL, the "
               f"same for every client), greedy, {MAX_TOKENS} tokens a turn, all conversations at once, against one "
               "CPU vLLM 0.32 "
               "(scripts/vllm_server.sh, float32) on the tiny Qwen2-VL model; one warm-up conversation each first. "
               "renderers 0.1.12 reads vLLM < 0.32 logprob entries ({\"token\": \"token_id:N\"}) and rejects 0.32's "
               "({\"token_id\": N}); the bench adapts that one parse function and nothing else. "
               "verifiers' renderer is renderers' Qwen3-VL one (the Qwen-VL renderer it has), so its prompts differ "
               f"slightly from the Qwen2-VL template. rollwire content_parts' render check of the server: "
               f"{ours_by_mode['content-parts']['originals']} (True: such JPEGs go as they are). {why}."],
        figures={"rollwire": ours_by_mode, "verifiers": theirs, "conversations": n, "turns": TURNS,
                 "modes_identical": same},
    )
