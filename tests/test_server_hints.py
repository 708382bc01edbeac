"""A server that cannot take rollwire's requests says what to change: vLLM without
--enable-scale-out answers 403 on the token-in/token-out endpoints (it used to surface as a bare
pixel-format error); a server without the endpoint answers 404. A real HTTP server on loopback."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rollwire.engines.types import GenerateRequest, SamplingParams
from rollwire.engines.vllm import VLLMEngine
from rollwire.errors import InvalidRequestError, PixelFormatError
from rollwire.render import create_renderer


def serve(status: int) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _send(self, code: int, body: dict[str, object]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._send(200, {"object": "list", "data": [{"id": "m", "max_model_len": 4096}]})

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self._send(status, {"error": {"message": "Forbidden" if status == 403 else "Not Found"}})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(params=[403, 404])
def server(request: pytest.FixtureRequest) -> Iterator[tuple[int, str]]:
    for url in serve(request.param):
        yield request.param, url


HINTS = {403: "--enable-scale-out", 404: "/inference/v1/generate"}


async def test_the_error_says_what_to_change(server: tuple[int, str], tiny: Callable[[str], Path]) -> None:
    status, url = server
    renderer = create_renderer(tiny("qwen2_vl"))
    engine = VLLMEngine.for_renderer(url, renderer, model="m")
    with pytest.raises(PixelFormatError, match=HINTS[status]):  # the probe is the first POST
        await engine.connect()
    await engine.close()
    text_only = VLLMEngine.for_renderer(url, create_renderer(tiny("qwen3")), model="m")
    prompt = create_renderer(tiny("qwen3")).render([{"role": "user", "content": "hi"}])
    with pytest.raises(InvalidRequestError, match=HINTS[status]):
        await text_only.generate(GenerateRequest(prompt_token_ids=prompt.token_ids,
                                                 sampling=SamplingParams(max_tokens=2)))
    await text_only.close()
