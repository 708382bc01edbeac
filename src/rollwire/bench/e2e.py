"""`rollwire bench e2e`: the same multi-turn image conversations against one CPU vLLM and the tiny
Qwen2-VL model, through rollwire and through verifiers 0.4.0's client path.

verifiers 0.4.0 sends multimodal prompts with renderers 0.1.12's `generate(process_multimodal=
False)`: the prompt bridged (or rendered) by its Qwen3-VL renderer with one pad per image, and
`content_parts` with every image of the conversation, as its data URL, on every turn. rollwire
sends its features (each image's uint8 patches once, later turns by id). Both run their
conversations concurrently; request bytes are counted on the wire (httpx request hooks).
Needs `.venv-baselines` (scripts/setup_baselines.sh) for the verifiers side; without it, only
rollwire's side is measured and the table says so.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from functools import partial
from pathlib import Path
from typing import Any, cast

from rollwire.bench.images import encoded, photo
from rollwire.bench.instant import Pictures, run_rollouts
from rollwire.bench.report import Report, Table

PORT = 8871
TURNS = 4  # the server script allows 4 images a prompt
CONVERSATIONS, QUICK_CONVERSATIONS = 8, 2
SIDE = 224
MAX_TOKENS = 12
QUESTION = "What changed?"


def _picture(conversation: int, turn: int) -> Any:
    return photo(SIDE, SIDE, seed=1000 * conversation + turn)


def start_server(model_dir: Path) -> int:
    script = Path(__file__).resolve().parents[3] / "scripts" / "vllm_server.sh"
    if not script.is_file():
        raise RuntimeError("scripts/vllm_server.sh not found (a source checkout is needed); pass --server URL")
    env = {"VLLM_HEALTH_TIMEOUT": "480", **os.environ, "VLLM_EXTRA_ARGS": "--dtype float32"}
    out = subprocess.run(["bash", str(script), str(model_dir), str(PORT), "qwen2_vl"], capture_output=True,
                         text=True, env=env, check=False, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"vLLM did not start:\n{out.stderr[-2000:]}")
    return int(out.stdout.strip().splitlines()[-1])


def stop_server(pid: int) -> None:
    try:
        os.kill(pid, 2)
    except ProcessLookupError:
        return
    for _ in range(60):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    os.killpg(pid, 9)


async def rollwire_side(url: str, model_dir: Path, n: int) -> dict[str, Any]:
    from rollwire.engines.vllm import VLLMEngine
    from rollwire.render import create_renderer

    renderer: Any = create_renderer(model_dir)
    engine = VLLMEngine.for_renderer(url, renderer, model="qwen2_vl")
    try:
        envs = [Pictures(partial(_picture, i), TURNS) for i in range(n)]
        await run_rollouts(renderer, envs[:1], TURNS, engine)  # warm-up (its images are not reused)
        envs = [Pictures(partial(_picture, i), TURNS) for i in range(n)]
        start = time.perf_counter()
        results = await run_rollouts(renderer, envs, TURNS, engine)
        seconds = time.perf_counter() - start
    finally:
        await engine.close()
    trajs = [r.trajectory for r in results]
    errors = [t.error.message for t in trajs if t.error]
    return {"seconds": seconds, "rollouts_s": n / seconds, "turns": sum(len(t.steps) for t in trajs),
            "bytes": int(sum(t.metrics.get("bytes_sent", 0) for t in trajs)), "failed": len(errors),
            "errors": errors[:1]}


async def verifiers_side(url: str, model_dir: Path, n: int) -> dict[str, Any]:
    import httpx
    import renderers
    from openai import AsyncOpenAI
    from renderers.client import generate
    from transformers import AutoProcessor, AutoTokenizer

    sent = [0]

    async def count(request: httpx.Request) -> None:
        sent[0] += len(request.content)

    http = httpx.AsyncClient(event_hooks={"request": [count]}, timeout=600)
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", http_client=cast(Any, http))
    renderer = renderers.Qwen3VLRenderer(AutoTokenizer.from_pretrained(str(model_dir)),
                                         processor=AutoProcessor.from_pretrained(str(model_dir)))

    def user(i: int, turn: int) -> dict[str, Any]:
        data = encoded(_picture(i, turn), "JPEG")
        url_ = "data:image/jpeg;base64," + __import__("base64").b64encode(data).decode()
        return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url_}},
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
    errors = [f"{type(o).__name__}: {o}" for o in outcomes if isinstance(o, BaseException)]
    return {"seconds": seconds, "rollouts_s": n / seconds, "turns": sum(o for o in outcomes if isinstance(o, int)),
            "bytes": sent[0], "failed": len(errors), "errors": errors[:1]}


def run(quick: bool = False, server: str | None = None) -> Report:
    from rollwire.tiny_model import ensure_tiny_model

    model_dir = ensure_tiny_model("qwen2_vl")
    n = QUICK_CONVERSATIONS if quick else CONVERSATIONS
    pid = None
    if server is None:
        pid = start_server(model_dir)
        server = f"http://127.0.0.1:{PORT}"
    try:
        ours = asyncio.run(rollwire_side(server, model_dir, n))
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
    table.add("rollwire (features, each image once)", f"{n} × {TURNS}", f"{ours['seconds']:.2f}",
              f"{ours['rollouts_s']:.2f}", f"{ours['bytes']:,}", ours["failed"])
    if theirs is not None:
        table.add("verifiers 0.4.0 (content_parts, every image every turn)", f"{n} × {TURNS}",
                  f"{theirs['seconds']:.2f}", f"{theirs['rollouts_s']:.2f}", f"{theirs['bytes']:,}", theirs["failed"])
    summary = f"rollwire {ours['rollouts_s']:.2f} rollouts/s, {ours['bytes']:,} request bytes"
    if theirs is not None:
        summary += (f"; verifiers 0.4.0 {theirs['rollouts_s']:.2f} rollouts/s, {theirs['bytes']:,} bytes "
                    f"({theirs['bytes'] / max(ours['bytes'], 1):.2f}× rollwire's)")
    return Report(
        name="e2e", command="rollwire bench e2e" + (" --quick" if quick else ""), summary=summary + ".",
        tables=[table],
        notes=[f"{n} conversations of {TURNS} turns, a new {SIDE}² photo-like picture per turn (verifiers: as a JPEG "
               f"data URL), greedy, {MAX_TOKENS} tokens a turn, all conversations at once, against one CPU vLLM 0.32 "
               "(scripts/vllm_server.sh, float32) on the tiny Qwen2-VL model; one warm-up conversation each first. "
               "verifiers' renderer is renderers' Qwen3-VL one (the Qwen-VL renderer it has), so its prompts differ "
               f"slightly from the Qwen2-VL template. {why}."],
        figures={"rollwire": ours, "verifiers": theirs, "conversations": n, "turns": TURNS},
    )
