"""Start and stop the CPU vLLM of a source checkout (scripts/vllm_server.sh), for the e2e benchmark
and the vLLM-tier tests: one place that knows how the script is called and how a server is stopped."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "vllm_server.sh"


def start_server(model_dir: Path, family: str, port: int, *, dtype: str = "float32", extra_args: str = "",
                 timeout: float = 400, env: dict[str, str] | None = None) -> int:
    """Run scripts/vllm_server.sh (it returns once /health answers) and return the server's PID.

    `VLLM_SERVER_DEV_MODE` mounts vLLM's RL endpoints (/pause, /resume, /update_weight_version);
    `env` adds to (and `VLLM_HEALTH_TIMEOUT` there overrides) the script's environment."""
    if not SCRIPT.is_file():
        raise RuntimeError(f"{SCRIPT} not found (a source checkout is needed): pass a running server's URL")
    full = {**os.environ, **(env or {}), "VLLM_SERVER_DEV_MODE": "1",
            "VLLM_EXTRA_ARGS": f"--dtype {dtype} {extra_args}".strip()}
    out = subprocess.run(["bash", str(SCRIPT), str(model_dir), str(port), family], capture_output=True, text=True,
                         env=full, check=False, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"vLLM did not start:\n{out.stderr[-3000:]}")
    return int(out.stdout.strip().splitlines()[-1])


def stop_server(pid: int) -> None:
    """SIGINT, then SIGKILL to the process group if it is still there after 30 s."""
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
