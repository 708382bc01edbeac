"""The `dataset` environment on real files: JSONL, Parquet and a saved Hugging Face dataset, images
by path, data URL, bytes and `datasets` Image feature, rewards by import path, feedback turns."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from rollwire.errors import DatasetError, EnvSpecError
from rollwire.render import create_renderer, validate_placeholders
from rollwire.rollout import RolloutConfig, make_env, run_rollout
from rollwire.testing import ScriptedEngine

SEEN: list[dict[str, Any]] = []


def number_reward(response: str, answer: Any, turn: int) -> float:
    """Test reward: 1 when the response holds the answer's digits."""
    SEEN.append({"response": response, "answer": answer, "turn": turn})
    return float(str(answer) in response)


async def async_reward(completion: list[dict[str, Any]], **kwargs: Any) -> bool:
    return len(completion) > 0


def asks_for_too_much(response: str, secret: str) -> float:
    return 0.0


def not_a_number(response: str) -> str:
    return "high"


def png(colour: str, size: tuple[int, int] = (56, 56)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def renderer(tiny: Callable[[str], Path]) -> Any:
    return create_renderer(tiny("qwen2_vl"))


@pytest.fixture
def jsonl(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "red.png").write_bytes(png("red"))
    data_url = "data:image/png;base64," + base64.b64encode(png("blue", (28, 56))).decode()
    rows = [
        {"question": "What is 2 + 3?", "answer": 5, "images": ["img/red.png"], "info": {"level": 1}},
        {"prompt": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Left <image> right <image>. How many pictures?"}],
         "images": ["img/red.png", data_url], "answer": "2"},
        {"messages": [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "yes"}]},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


async def test_jsonl_rows_single_turn_with_images_and_a_reward_by_import_path(renderer: Any, jsonl: Path) -> None:
    SEEN.clear()
    env_args = {"path": str(jsonl), "reward": "test_dataset_env:number_reward", "system_prompt": "You do sums."}
    engine = ScriptedEngine(renderer, ["The answer is 5."])
    result = await run_rollout(make_env("dataset", **env_args), renderer, engine, RolloutConfig(), seed=0,
                               trajectory_id="d0")
    t = result.trajectory
    assert t.error is None and t.finish == "done" and t.rewards == [1.0] and len(t.steps) == 1
    assert t.env_info == {"row": 0, "answer": 5, "info": {"level": 1}}
    assert SEEN == [{"response": "The answer is 5.", "answer": 5, "turn": 1}]
    assert [m["role"] for m in t.messages] == ["system", "user", "assistant"]
    assert t.messages[0]["content"] == "You do sums."
    assert [p["type"] for p in t.messages[1]["content"]] == ["image", "text"]  # images before the text
    step = t.steps[0]
    assert len(step.images) == 1 and step.images[0].grid_thw == (1, 4, 4)  # the 56x56 red picture
    validate_placeholders(step.prompt_ids, step.images, pad_id=renderer.image_pad_id, merge_size=2,
                          known_ids=renderer.feature_store)

    # row 1: `<image>` markers take the images in order (a path and a data URL); its own system prompt stays
    result = await run_rollout(make_env("dataset", **env_args), renderer, ScriptedEngine(renderer, ["2"]),
                               RolloutConfig(), seed=1, trajectory_id="d1")
    t = result.trajectory
    assert t.rewards == [1.0] and t.messages[0]["content"] == "Be brief."
    assert [p["type"] for p in t.messages[1]["content"]] == ["text", "image", "text", "image", "text"]
    square, tall = (r.grid_thw for r in t.steps[0].images)
    assert square == (1, 4, 4) and tall[1] > tall[2]  # the red square, then the tall blue data URL
    # row 2: a chat whose last assistant message is the answer
    prompt = await make_env("dataset", path=str(jsonl)).reset(2)
    assert prompt.info["answer"] == "yes" and [m["role"] for m in prompt.messages] == ["user"]


async def test_feedback_turns_until_right_or_max_turns(renderer: Any, jsonl: Path) -> None:
    env_args = {"path": str(jsonl), "reward": "test_dataset_env:number_reward", "max_turns": 3}
    engine = ScriptedEngine(renderer, ["I think 4.", "Then 5."])
    result = await run_rollout(make_env("dataset", **env_args), renderer, engine, RolloutConfig(max_turns=5),
                               seed=0, trajectory_id="f")
    t = result.trajectory
    assert t.error is None and t.rewards == [0.0, 1.0] and t.reward == 1.0 and len(t.steps) == 2
    assert [m["role"] for m in t.messages] == ["user", "assistant", "user", "assistant"]
    assert t.messages[2] == {"role": "user", "content": "That is not correct. Try again."}
    assert t.steps[1].bridged and t.metadata["env_steps"][0] == {"turn": 1, "score": 0.0}
    # never right: it stops after max_turns answers with the last score
    engine = ScriptedEngine(renderer, ["1", "2", "3", "4"])
    result = await run_rollout(make_env("dataset", **env_args), renderer, engine, RolloutConfig(max_turns=9),
                               seed=0, trajectory_id="g")
    assert len(result.trajectory.steps) == 3 and result.trajectory.finish == "done"
    # an async reward given as a function, and a feedback function that ends the rollout
    env = make_env("dataset", path=str(jsonl), reward=async_reward, max_turns=3, success=2.0,
                   feedback=lambda turn: None if turn >= 2 else f"turn {turn}: try again")
    result = await run_rollout(env, renderer, ScriptedEngine(renderer, ["a", "b", "c"]), RolloutConfig(),
                               seed=0, trajectory_id="h")
    t = result.trajectory
    assert t.rewards == [0.0, 1.0] and t.messages[2]["content"] == "turn 1: try again"


def test_parquet_rows_with_hf_style_image_parts_and_bytes(renderer: Any, tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({
        "messages": [[{"role": "user", "content": [{"type": "image", "text": None},
                                                   {"type": "text", "text": "Colour?"}]}]],
        "images": [[{"bytes": png("green"), "path": None}]],
        "answer": ["green"],
    })
    path = tmp_path / "rows.parquet"
    pq.write_table(table, path)
    env = make_env("dataset", path=str(path), reward="rollwire.rollout.envs.dataset:contains_answer")
    obs = asyncio_run(env.reset(0))
    (message,) = obs.messages
    image, text = message["content"]
    assert image.image == png("green") and text.text == "Colour?"  # the cell's bytes, as they are
    assert obs.info == {"row": 0, "answer": "green"}


def test_a_saved_hugging_face_dataset_with_an_image_feature(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"question": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "image": datasets.Image()})
    data = datasets.Dataset.from_dict({"question": ["Colour?", "Shade?"], "answer": ["red", "blue"],
                                       "image": [Image.new("RGB", (30, 20), "red"), Image.new("RGB", (8, 8), "blue")]},
                                      features=features)
    data.save_to_disk(str(tmp_path / "ds"))
    env = make_env("dataset", path=str(tmp_path / "ds"))
    obs = asyncio_run(env.reset(1))
    image, text = obs.messages[0]["content"]
    assert image.image.size == (8, 8) and image.image.getpixel((0, 0)) == (0, 0, 255) and text.text == "Shade?"
    step = asyncio_run(env.step(_assistant(" BLUE ")))  # the default reward: exact match, case-folded
    assert step.done and step.reward == 1.0
    # a Dataset object directly, from Python
    env = make_env("dataset", rows=data, reward=lambda response, answer: float(answer in response))
    assert asyncio_run(env.reset(0)).info["answer"] == "red"


@pytest.mark.parametrize(("rows", "env_args", "needle"), [
    ([{"text": "hi"}], {}, "row 0: no prompt (expected a column prompt / messages / question"),
    ([{"question": "<image> <image>", "images": ["img/red.png"]}], {}, "row 0: more image markers than images"),
    ([{"question": "a <image>", "images": ["img/red.png", "img/red.png"]}], {}, "1 image markers but 2 images"),
    ([{"question": "q", "images": ["/etc/hostname"]}], {}, "ImagePathNotAllowedError"),
    ([{"question": "q", "images": ["https://example.com/a.png"]}], {}, "RemoteImageNotAllowedError"),
    ([{"question": "q", "images": [7]}], {}, "row 0, image 0: not an image"),
    ([{"question": "q", "images": ["img/gone.png"]}], {}, "ImageNotFoundError: image file not found"),
])
def test_bad_rows_are_errors_naming_the_row(jsonl: Path, rows: list[dict[str, Any]], env_args: dict[str, Any],
                                            needle: str) -> None:
    path = jsonl.parent / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    env = make_env("dataset", path=str(path), **env_args)
    with pytest.raises(DatasetError) as info:
        asyncio_run(env.reset(0))
    assert needle in str(info.value)


def test_bad_settings_fail_when_the_environment_is_made(jsonl: Path, tmp_path: Path) -> None:
    with pytest.raises(EnvSpecError, match="asks for secret; it may ask for completion, response"):
        make_env("dataset", path=str(jsonl), reward="test_dataset_env:asks_for_too_much")
    with pytest.raises(EnvSpecError, match="cannot import 'no_such_module_q'"):
        make_env("dataset", path=str(jsonl), reward="no_such_module_q:f")
    with pytest.raises(DatasetError, match=r"unknown format '\.csv'"):
        (tmp_path / "rows.csv").write_text("a,b\n")
        make_env("dataset", path=str(tmp_path / "rows.csv"))
    with pytest.raises(DatasetError, match="line 2: not JSON"):
        (tmp_path / "broken.jsonl").write_text('{"question": "q"}\n{oops\n')
        make_env("dataset", path=str(tmp_path / "broken.jsonl"))
    with pytest.raises(DatasetError, match="No such file"):
        make_env("dataset", path=str(tmp_path / "missing.jsonl"))
    with pytest.raises(EnvSpecError, match="does not take these arguments"):
        make_env("dataset", path=str(jsonl), colums={})


async def test_a_reward_that_is_not_a_number_ends_the_rollout_as_an_env_error(renderer: Any, jsonl: Path) -> None:
    env = make_env("dataset", path=str(jsonl), reward="test_dataset_env:not_a_number")
    result = await run_rollout(env, renderer, ScriptedEngine(renderer, ["x"]), RolloutConfig(), seed=0,
                               trajectory_id="n")
    error = result.trajectory.error
    assert error is not None and error.kind == "env_error" and "returned str 'high', not a number" in error.message


async def test_a_resume_after_the_data_changed_is_refused(tiny: Callable[[str], Path], renderer: Any,
                                                          jsonl: Path, tmp_path: Path) -> None:
    from rollwire.errors import ManifestMismatchError
    from rollwire.rollout import RunConfig, run_to_dir

    config = RunConfig(env="dataset", n_prompts=3, group=1, env_kwargs={"path": str(jsonl)})
    out = tmp_path / "run"
    summary = await run_to_dir(config, out, model=tiny("qwen2_vl"), renderer=renderer,
                               engine=ScriptedEngine(renderer, ["5"]))
    assert summary.done == 3
    recorded = json.loads((out / "run.json").read_text())["settings"]["env_fingerprint"]
    assert recorded == "sha256:" + hashlib.sha256(jsonl.read_bytes()).hexdigest()
    again = await run_to_dir(config, out, model=tiny("qwen2_vl"), renderer=renderer,
                             engine=ScriptedEngine(renderer, []))
    assert again.skipped == 3  # same data: a resume
    jsonl.write_text(jsonl.read_text().replace('"answer": 5', '"answer": 6'))
    with pytest.raises(ManifestMismatchError, match="env_fingerprint"):
        await run_to_dir(config, out, model=tiny("qwen2_vl"), renderer=renderer, engine=ScriptedEngine(renderer, []))
    assert len((out / "rollouts.jsonl").read_text().splitlines()) == 3


def asyncio_run(coro: Any) -> Any:
    import asyncio

    return asyncio.run(coro)


def _assistant(text: str) -> Any:
    from rollwire.messages import Message

    return Message(role="assistant", content=text)


async def test_dataset_images_reach_the_run_directory_as_their_own_bytes(renderer: Any, tmp_path: Path) -> None:
    """A row's image file is carried as its encoded bytes (not a decoded PIL image), so the archive keeps
    the file as it is and content_parts can send it as it is; a PIL image would be re-encoded."""
    from rollwire.store import RunReader, RunWriter

    buf = io.BytesIO()
    Image.new("RGB", (60, 44), "orange").save(buf, format="JPEG", quality=85)
    (tmp_path / "photo.jpg").write_bytes(buf.getvalue())
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"question": "Colour?", "answer": "orange", "images": ["photo.jpg"]}) + "\n")
    env = make_env("dataset", path=str(data), reward="test_dataset_env:number_reward")
    assert (await env.reset(0)).messages[0]["content"][0].image == buf.getvalue()
    with RunWriter(tmp_path / "run", renderer.feature_store) as writer:
        result = await run_rollout(make_env("dataset", path=str(data), reward="test_dataset_env:number_reward"),
                                   renderer, ScriptedEngine(renderer, ["orange"]), RolloutConfig(), seed=0,
                                   trajectory_id="j", archive=writer)
        writer.write(result.trajectory, result.originals)
    t = result.trajectory
    assert t.error is None and len(t.image_ids) == 1
    archived = RunReader(tmp_path / "run").original_path(t.image_ids[0])
    assert archived.suffix == ".jpg" and archived.read_bytes() == buf.getvalue()
