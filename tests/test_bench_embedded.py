"""`rollwire bench embedded`: the old sampler it measures against really samples softmax, really
replaces the engine's draw while swapped in, and the quick run writes well-formed figures."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from test_bench import bench

torch = pytest.importorskip("torch")


def test_the_baseline_draw_samples_the_softmax() -> None:
    from rollwire.bench.embedded import multinomial_draw

    generator = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.0, float(torch.log(torch.tensor(3.0))), -float("inf")])  # 1/4, 3/4, never
    counts = [0, 0, 0]
    for _ in range(4000):
        counts[multinomial_draw(torch, logits, generator)] += 1
    assert counts[2] == 0 and abs(counts[1] / 4000 - 0.75) < 0.03  # > 4 sigma of 0.0068


def test_the_swapped_draw_is_the_one_the_engine_uses(tiny: Callable[[str], Path]) -> None:
    from rollwire.bench.embedded import sampler
    from rollwire.engines import local, local_sampler
    from rollwire.engines.types import GenerateRequest, SamplingParams
    from rollwire.render import create_renderer

    model = tiny("qwen2_vl")
    renderer = create_renderer(model)
    own = local_sampler.inverse_cdf
    picked: list[int] = []

    def always_7(torch: object, logits: object, generator: object) -> int:
        picked.append(7)
        return 7

    request = GenerateRequest(prompt_token_ids=renderer.render([{"role": "user", "content": "hi"}]).token_ids,
                              sampling=SamplingParams(max_tokens=5, temperature=1.0, seed=1))

    async def main() -> tuple[list[int], list[int], int, float]:
        async with local.LocalEngine(model, feature_store=renderer.feature_store) as engine:
            with sampler(always_7) as draws:
                swapped = (await engine.generate(request)).completions[0].token_ids
            assert local_sampler.inverse_cdf is own  # restored
            return swapped, (await engine.generate(request)).completions[0].token_ids, draws.count, draws.seconds

    swapped, after, count, seconds = asyncio.run(main())
    assert swapped == [7] * 5 and count == 5 and seconds > 0 and len(picked) == 5
    assert after != [7] * 5 and len(picked) == 5  # its own draw again


def test_quick_run_writes_its_section(tmp_path: Path, tiny: Callable[[str], Path]) -> None:
    doc = tmp_path / "benchmarks.md"
    out = bench("embedded", "--quick", "--json", "--write", str(doc))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    figures = report["figures"]
    config = json.loads((tiny("qwen2_vl") / "config.json").read_text())
    assert figures["vocab"] == config["text_config"]["vocab_size"] == 151669  # Qwen2-VL's real vocabulary
    assert set(figures["variants"]) == {"current", "old sampler", "before"} and figures["torch_threads"] == 1
    w = figures["workload"]
    for name, v in figures["variants"].items():
        (run,) = v["runs"]
        assert run["rollouts"] == w["n_prompts"] * w["group"], name
        assert run["completion_tokens"] > 0 and v["rollouts_per_s"] > 0 and 0 < v["draw_share"] < 1, name
    assert figures["sampler_ms_per_row"]["current"] > 0 and figures["sampler_ms_per_row"]["multinomial"] > 0
    text = doc.read_text()
    assert "<!-- embedded:start -->\n## embedded\n\n`rollwire bench embedded --quick`" in text
    assert "| inverse CDF (current) |" in text and "<!-- embedded:end -->" in text
