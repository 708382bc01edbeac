"""The OpenAI front, driven by the `openai` client as a harness would drive it (embedded tiny qwen2_vl)."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from conftest import make_image
from rollwire.front import FrontServer
from rollwire.render.types import Renderer
from rollwire.store import RunReader
from rollwire.testing import ScriptedEngine
from rollwire.training import SampleBuilder

TOOLS = [{"type": "function", "function": {"name": "zoom", "description": "Zoom into the image.", "parameters": {
    "type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}, "required": ["x"]}}}]


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_part(source: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": source}}


@pytest.fixture(scope="module")
def front(tiny: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[FrontServer]:
    roots = tmp_path_factory.mktemp("front-images")
    make_image(40, 56, seed=5).save(roots / "photo.png")
    with FrontServer(tiny("qwen2_vl"), run_dir=tmp_path_factory.mktemp("front-run"), port=0,
                     image_roots=[roots]) as server:
        server.image_root = roots  # type: ignore[attr-defined]
        yield server


def client(front: FrontServer, session: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{front.url}/v1", api_key="unused", max_retries=0,
                         default_headers={"X-Session-ID": session} if session else None)


def extra(response: Any) -> dict[str, Any]:
    return dict(response.model_extra)


def completion_ids(response: Any) -> list[int]:
    return list(response.choices[0].model_extra["token_ids"])


def test_models_lists_the_served_model(front: FrontServer) -> None:
    models = client(front).models.list().data
    assert [m.id for m in models] == ["qwen2_vl-v1"]
    assert models[0].model_extra["max_model_len"] == front.max_model_len > 0


def test_multi_turn_with_images_and_tools_is_bridged_and_recorded(front: FrontServer) -> None:
    renderer = front.renderer
    assert renderer is not None
    photo = str(front.image_root / "photo.png")  # type: ignore[attr-defined]
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You look at images."},
        {"role": "user", "content": [image_part(data_url(make_image(64, 48, seed=1))), image_part(photo),
                                     {"type": "text", "text": "Where is the cat?"}]},
        # what the policy said earlier, as the harness keeps it: a tool call and its image result
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "zoom", "arguments": '{"x": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [
            image_part(data_url(make_image(32, 32, seed=2))), {"type": "text", "text": "zoomed"}]},
    ]
    api = client(front, "episode-1")
    r1 = api.chat.completions.create(model="qwen2_vl-v1", messages=messages, tools=TOOLS,  # type: ignore[arg-type]
                                     max_tokens=6, temperature=1.0, seed=11, logprobs=True)
    ids1, prompt1 = completion_ids(r1), extra(r1)["prompt_token_ids"]
    info1 = extra(r1)["rollwire"]
    assert (info1["session_id"], info1["step"], info1["bridged"], info1["render_reason"]) == (
        "episode-1", 0, False, "first call")
    assert len(info1["images"]) == 3 and r1.usage is not None
    assert (r1.usage.prompt_tokens, r1.usage.completion_tokens) == (len(prompt1), len(ids1))
    body = ids1[:-1] if ids1[-1] in renderer.stop_token_ids else ids1
    assert renderer.decode(body) == r1.choices[0].message.content
    content = r1.choices[0].logprobs.content  # type: ignore[union-attr]
    assert [c.logprob for c in content] == info1["completion_logprobs"] and len(content) == len(ids1)
    assert [c.token for c in content] == [renderer.decode([t]) for t in ids1]

    messages += [{"role": "assistant", "content": r1.choices[0].message.content},
                 {"role": "user", "content": [image_part(data_url(make_image(48, 40, seed=3))),
                                              {"type": "text", "text": "And here?"}]}]
    r2 = api.chat.completions.create(model="qwen2_vl-v1", messages=messages, tools=TOOLS,  # type: ignore[arg-type]
                                     max_tokens=6, temperature=1.0, seed=12)
    prompt2, info2 = extra(r2)["prompt_token_ids"], extra(r2)["rollwire"]
    assert info2["bridged"] is True and info2["render_reason"] is None and info2["step"] == 1
    assert prompt2[:len(prompt1) + len(ids1)] == prompt1 + ids1  # the sampled tokens were not re-rendered
    assert info2["images"][:3] == info1["images"] and len(info2["images"]) == 4
    assert r2.choices[0].logprobs is None  # not asked for

    reader = RunReader(front.run_dir)
    rows = [row for row in reader.rows(all_rows=True) if row["id"] == "episode-1"]
    assert [(row["turns"], row["superseded"]) for row in rows] == [(1, True), (2, False)]
    trajectory = reader.trajectory(rows[-1])
    first, second = trajectory.steps
    assert (list(first.prompt_ids), list(first.completion_ids), first.bridged) == (prompt1, ids1, False)
    assert (list(second.prompt_ids), list(second.completion_ids), second.bridged) == (prompt2, completion_ids(r2), True)
    assert list(first.completion_logprobs) == pytest.approx(info1["completion_logprobs"])
    assert trajectory.metrics["bridge_successes"] == 1
    assert trajectory.messages[1]["content"][0] == {"type": "image", "image_id": info1["images"][0]["id"]}
    assert trajectory.messages[-1]["role"] == "assistant" and trajectory.tools == TOOLS
    assert reader.image(info1["images"][1]["id"]).size == (40, 56)  # the file's original, archived
    reader.load_features(renderer.feature_store, trajectory)  # type: ignore[arg-type]
    (sample,) = SampleBuilder.for_renderer(renderer).build(trajectory)  # one bridged session: one sample
    assert list(sample.input_ids) == prompt2 + completion_ids(r2)
    assert int(sample.loss_mask.sum()) == len(ids1) + len(completion_ids(r2))


def test_an_edited_history_is_rendered_in_full_with_the_reason(front: FrontServer) -> None:
    api = client(front, "edited")
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Say something."}]
    r1 = api.chat.completions.create(model="qwen2_vl-v1", messages=messages, max_tokens=4, seed=1)  # type: ignore[arg-type]
    messages += [{"role": "assistant", "content": (r1.choices[0].message.content or "") + " (edited)"},
                 {"role": "user", "content": "Again."}]
    r2 = api.chat.completions.create(model="qwen2_vl-v1", messages=messages, max_tokens=4, seed=2)  # type: ignore[arg-type]
    info = extra(r2)["rollwire"]
    assert (info["bridged"], info["render_reason"]) == (False, "history rewritten")
    assert front.renderer is not None
    assert extra(r2)["prompt_token_ids"] == list(front.renderer.render(messages).token_ids)
    row = next(r for r in RunReader(front.run_dir).rows() if r["id"] == "edited")
    trajectory = RunReader(front.run_dir).trajectory(row)
    assert trajectory.metrics["full_render:history rewritten"] == 1
    assert [(s.render_reason, s.branch) for s in trajectory.steps] == [("first call", 0), ("history rewritten", 1)]


def test_stop_strings_cut_the_completion_like_vllm(front: FrontServer) -> None:
    api = client(front)  # no session id: each call is a one-call trajectory
    messages = [{"role": "user", "content": "Write."}]
    full = api.chat.completions.create(model="qwen2_vl-v1", messages=messages, max_tokens=8, seed=5)  # type: ignore[arg-type]
    text, ids = full.choices[0].message.content or "", completion_ids(full)
    assert front.renderer is not None
    stop = next(s for s in (front.renderer.decode(ids[k:k + 1]) for k in range(3, len(ids))) if s.strip())
    cut = api.chat.completions.create(model="qwen2_vl-v1", messages=messages, max_tokens=8, seed=5,  # type: ignore[arg-type]
                                      stop=[stop])
    assert cut.choices[0].message.content == text[:text.find(stop)]
    assert cut.choices[0].finish_reason == "stop" and extra(cut)["rollwire"]["stop_reason"] == stop
    kept = completion_ids(cut)
    assert kept == ids[:len(kept)] and stop in front.renderer.decode(kept)
    assert extra(cut)["rollwire"]["session_id"] != extra(full)["rollwire"]["session_id"]


def test_an_ended_session_continues_under_a_new_trajectory_id(front: FrontServer) -> None:
    api = client(front, "short")
    api.chat.completions.create(model="qwen2_vl-v1", messages=[{"role": "user", "content": "a"}], max_tokens=2)
    answer = httpx.delete(f"{front.url}/v1/sessions/short").json()
    assert (answer["deleted"], answer["steps"], answer["trajectory_id"]) == (True, 1, "short")
    again = api.chat.completions.create(model="qwen2_vl-v1", messages=[{"role": "user", "content": "b"}], max_tokens=2)
    assert extra(again)["rollwire"]["trajectory_id"] == "short~1"
    assert httpx.delete(f"{front.url}/v1/sessions/nobody").status_code == 404


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(("request_kwargs", "needle"), [
    ({"messages": [{"role": "robot", "content": "hi"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": [image_part("data:image/png;base64,AAAA")]}]}, "data URL"),
    ({"messages": [{"role": "user", "content": [image_part("/etc/hostname")]}]}, "outside the allowed folders"),
    ({"messages": [{"role": "user", "content": [image_part("https://example.com/a.png")]}]}, "remote image URLs"),
    ({"messages": [{"role": "tool", "content": "42"}]}, "does not follow an assistant tool call"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n=2"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "retrieval"}]}, "unsupported tool type"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 3}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, "temperature=5"),
    ({"messages": HI, "extra_body": {"repetition_penalty": 1.3}}, "repetition_penalty"),
    ({"messages": HI, "extra_body": {"chat_template_kwargs": {"enable_thinking": False}}},
     "chat_template_kwargs.enable_thinking=False"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}, "maximum context length"),
    ({"messages": [{"role": "user", "content": "hi"}], "extra_headers": {"X-Session-ID": "bad id!"}}, "session id"),
])
def test_bad_requests_get_openai_errors(front: FrontServer, request_kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client(front).chat.completions.create(model="qwen2_vl-v1", **{"max_tokens": 2, **request_kwargs})
    assert caught.value.status_code == 400
    message = caught.value.body["message"]  # type: ignore[index]
    assert needle in message and "Traceback" not in message


def test_malformed_bodies_and_unknown_models(front: FrontServer) -> None:
    for raw, needle in ((b"{not json", "not JSON"), (b'{"messages": 3}', "invalid request"),
                        (b'{"messages": [{"role": "user", "content": "x"}], "stream": true}', "stream=true")):
        answer = httpx.post(f"{front.url}/v1/chat/completions", content=raw)
        assert answer.status_code == 400 and needle in answer.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client(front).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])


ZOOM_THEN_ANSWER: list[Any] = [
    {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
        "name": "zoom", "arguments": '{"x": 2}'}}]},
    "A cat."]


def test_tool_calls_are_parsed_and_their_results_bridged(tiny: Callable[[str], Path], tmp_path: Path) -> None:
    engines: list[ScriptedEngine] = []

    def make(renderer: Renderer) -> ScriptedEngine:
        engines.append(ScriptedEngine(renderer, ZOOM_THEN_ANSWER))
        return engines[-1]

    with FrontServer(tiny("qwen2_vl"), run_dir=tmp_path, port=0, make_engine=make) as front:
        api = client(front, "tools")
        messages: list[dict[str, Any]] = [{"role": "user", "content": [
            image_part(data_url(make_image(32, 40, seed=9))), {"type": "text", "text": "Find the cat."}]}]
        r1 = api.chat.completions.create(model="qwen2_vl-v1", messages=messages, tools=TOOLS)  # type: ignore[arg-type]
        choice = r1.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        call = choice.message.tool_calls[0]
        assert (call.function.name, json.loads(call.function.arguments)) == ("zoom", {"x": 2})  # type: ignore[union-attr]
        messages += [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": [
                         image_part(data_url(make_image(24, 24, seed=10))), {"type": "text", "text": "zoomed"}]}]
        r2 = api.chat.completions.create(model="qwen2_vl-v1", messages=messages, tools=TOOLS)  # type: ignore[arg-type]
        assert r2.choices[0].message.content == "A cat." and r2.choices[0].finish_reason == "stop"
        first, second = engines[0].requests
        assert extra(r2)["rollwire"]["bridged"] is True
        sampled = completion_ids(r1)
        assert sampled == engines[0].completion_ids(ZOOM_THEN_ANSWER[0])
        assert list(second.prompt_token_ids[:len(first.prompt_token_ids) + len(sampled)]) == [*first.prompt_token_ids,
                                                                                              *sampled]
        assert len(second.images) == 2 and second.images[0] == first.images[0]
    with FrontServer(tiny("qwen2_vl"), run_dir=tmp_path, port=0, make_engine=make) as again:  # a restart
        answer = client(again, "tools").chat.completions.create(
            model="qwen2_vl-v1", messages=[{"role": "user", "content": "Again."}], logit_bias={})
        assert extra(answer)["rollwire"]["trajectory_id"] == "tools~1"  # the earlier server's session is kept
    trajectory = next(t for t in RunReader(tmp_path).trajectories() if t.id == "tools")
    assert trajectory.steps[0].message.tool_calls[0].name == "zoom"
    assert trajectory.steps[0].message.tool_calls[0].id == call.id
    assert [m["role"] for m in trajectory.messages] == ["user", "assistant", "tool", "assistant"]


def test_over_a_rollwire_serve_upstream_each_image_is_sent_once(tiny: Callable[[str], Path], tmp_path: Path) -> None:
    """The token-in/token-out path (VLLMEngine) under the front: turn 2 sends turn 1's image by id only."""
    from rollwire.engines.server import EngineServer

    with EngineServer(tiny("qwen2_vl"), served_model_name="tiny") as upstream, \
            FrontServer(tiny("qwen2_vl"), upstream=upstream.url, run_dir=tmp_path, port=0) as front:
        assert front.served_model_name == "tiny"  # the upstream's name, as a harness configured for vLLM expects
        api = client(front, "remote")
        messages: list[dict[str, Any]] = [{"role": "user", "content": [
            image_part(data_url(make_image(56, 56, seed=4))), {"type": "text", "text": "Describe."}]}]
        r1 = api.chat.completions.create(model="tiny", messages=messages, max_tokens=3, seed=1)  # type: ignore[arg-type]
        messages += [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "More."}]
        assert front.renderer is not None and front.renderer.feature_store is not None
        front.renderer.feature_store.clear()  # evicted under pressure: turn 2 reads them back from the run's blobs
        r2 = api.chat.completions.create(model="tiny", messages=messages, max_tokens=3, seed=2)  # type: ignore[arg-type]
        assert extra(r2)["rollwire"]["bridged"] is True
        stats = upstream.stats()
        assert (stats.ok, stats.images_received, stats.cache_hits) == (2, 1, 1)


def test_the_cli_front_needs_a_run_dir() -> None:
    from typer.testing import CliRunner

    from rollwire.cli import app

    result = CliRunner().invoke(app, ["serve", "--upstream", "embedded"])
    assert result.exit_code == 2 and "--run-dir" in result.output


def test_reasoning_content_of_a_thinking_family(tiny: Callable[[str], Path], tmp_path: Path) -> None:
    """Qwen3 (text-only, thinks): the answer splits reasoning from content, and the echo without
    reasoning_content (what harnesses send back) still bridges."""
    script = ["<think>\nLet me see.\n</think>\n\nFour.", "Six."]
    with FrontServer(tiny("qwen3"), run_dir=tmp_path, port=0, make_engine=lambda r: ScriptedEngine(r, script)) as front:
        api = client(front, "think")
        messages: list[dict[str, Any]] = [{"role": "user", "content": "2+2?"}]
        r1 = api.chat.completions.create(model="qwen3-v1", messages=messages)  # type: ignore[arg-type]
        message = r1.choices[0].message
        assert (message.content, message.model_extra["reasoning_content"]) == ("Four.", "Let me see.")
        messages += [{"role": "assistant", "content": "Four."}, {"role": "user", "content": "3+3?"}]
        r2 = api.chat.completions.create(model="qwen3-v1", messages=messages)  # type: ignore[arg-type]
        assert extra(r2)["rollwire"]["bridged"] is True
    (trajectory,) = RunReader(tmp_path).trajectories()
    assert trajectory.steps[0].message.reasoning_content == "Let me see."


def test_sessions_come_from_the_header_or_the_body_and_run_concurrently(front: FrontServer) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def call(k: int) -> str:
        kwargs: list[dict[str, Any]] = [{"extra_headers": {"X-Session-ID": "h-0"}, "user": "ignored"},
                                        {"extra_body": {"session_id": "b-1"}, "user": "ignored"},
                                        {"metadata": {"session_id": "m-2"}}, {"user": "u-3"}]
        answer = client(front).chat.completions.create(
            model="qwen2_vl-v1", messages=[{"role": "user", "content": f"call {k}"}], max_tokens=2, **kwargs[k])
        return str(extra(answer)["rollwire"]["session_id"])

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(call, range(4))) == ["h-0", "b-1", "m-2", "u-3"]
    ids = {row["id"] for row in RunReader(front.run_dir).rows()}
    assert {"h-0", "b-1", "m-2", "u-3"} <= ids


def test_http_images_are_fetched_once_per_session(tiny: Callable[[str], Path], tmp_path: Path) -> None:
    """With --allow-remote-images an http(s) image is fetched when its message is rendered, not
    again on later (bridged) calls that resend it; a missing one is a 400."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    served: list[str] = []
    png = io.BytesIO()
    make_image(30, 20, seed=12).save(png, format="PNG")

    class Images(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            served.append(self.path)
            found = self.path == "/cat.png"
            self.send_response(200 if found else 404)
            self.send_header("Content-Length", str(len(png.getvalue()) if found else 0))
            self.end_headers()
            if found:
                self.wfile.write(png.getvalue())

        def log_message(self, *args: Any) -> None:
            pass

    images = ThreadingHTTPServer(("127.0.0.1", 0), Images)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{images.server_address[1]}"
    try:
        with FrontServer(tiny("qwen2_vl"), run_dir=tmp_path, port=0, allow_remote_images=True,
                         make_engine=lambda r: ScriptedEngine(r, ["One.", "Two."])) as front:
            api = client(front, "remote-images")
            messages: list[dict[str, Any]] = [{"role": "user", "content": [image_part(f"{url}/cat.png")]}]
            r1 = api.chat.completions.create(model="qwen2_vl-v1", messages=messages)  # type: ignore[arg-type]
            messages += [{"role": "assistant", "content": r1.choices[0].message.content},
                         {"role": "user", "content": "And?"}]
            r2 = api.chat.completions.create(model="qwen2_vl-v1", messages=messages)  # type: ignore[arg-type]
            assert extra(r2)["rollwire"]["bridged"] is True and served == ["/cat.png"]
            with pytest.raises(openai.BadRequestError, match="not found"):
                client(front).chat.completions.create(
                    model="qwen2_vl-v1", messages=[{"role": "user", "content": [image_part(f"{url}/dog.png")]}])
        (image_id,) = next(RunReader(tmp_path).trajectories()).image_ids
        assert RunReader(tmp_path).image(image_id).size == (30, 20)
    finally:
        images.shutdown()
        images.server_close()
