"""The viewer on real run directories (tests/view_runs.py): figures and summary.json, the page's
escaping, its bounded thumbnails, token boxes with logprobs, and the `view` / `inspect` commands."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from rollwire.cli import app
from rollwire.errors import MissingExtraError, ViewError
from rollwire.render.tokens import TextTokenizer
from rollwire.store import RunReader
from rollwire.view import SUMMARY, render_page, run_summary, write_page, write_summary
from rollwire.view.tokens import token_pieces
from rollwire.view.wandb_log import require_wandb
from view_runs import ANSWER, CROP, ENV_FAILURE, MARKUP, SCRIPT, STYLE, view_runs  # noqa: F401  (the session fixture)

DATA_URL = re.compile(r'"data:(image/[a-z]+);base64,([A-Za-z0-9+/=]+)"')


def originals(run: Path) -> list[Path]:
    """The run's archived originals (any format: a PIL image's TIFF, an encoded file as it was given)."""
    return sorted(p for p in run.glob("blobs/*/*") if p.suffix != ".features")


def raw_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]


class Tags(HTMLParser):
    """Every start tag with its attributes, and the page's text as a browser would show it."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.script_text: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in = tag

    def handle_endtag(self, tag: str) -> None:
        self._in = None

    def handle_data(self, data: str) -> None:
        (self.script_text if self._in in ("script", "style") else self.text).append(data)


def parse(page: str) -> Tags:
    tags = Tags()
    tags.feed(page)
    tags.close()
    return tags


def test_summary_figures_of_a_run_with_failures(view_runs: dict[str, Path]) -> None:  # noqa: F811
    run = view_runs["hostile"]
    rows = raw_rows(run)
    summary = write_summary(run)
    # 2 prompts x 2 samples; odd environment seeds fail in their first step (HostileEnv).
    assert summary["rollouts"] == {"total": 4, "done": 2, "failed": 2, "superseded_rows": 0, "unreadable": 0}
    assert summary["errors"] == {"env_error": 2}
    assert summary["finish"] == {"done": 2, "error": 2}
    assert summary["rewards"]["mean"] == 1.5 and summary["rewards"]["std"] == 0.0  # 0.5 + 1.0, done rollouts only
    assert summary["rewards"]["histogram"] == {"edges": [1.5, 1.5], "counts": [2]}
    assert summary["turns"]["per_rollout"] == {"1": 2, "2": 2}
    # Done: 2 images in turn 1's prompt, 3 in turn 2's; failed: 2. Unique: 3 per done group, 2 per failed.
    assert summary["images"] == {"unique": 5, "referenced": 2 * 5 + 2 * 2}
    assert summary["images"]["unique"] == len(list(run.glob("blobs/*/*.features")))
    assert summary["tokens"]["prompt"] == sum(r["prompt_tokens"] for r in rows)
    assert summary["tokens"]["completion"] == sum(r["completion_tokens"] for r in rows)
    assert json.loads((run / SUMMARY).read_text()) == summary
    assert not list(run.glob(".*.tmp"))


def test_summary_of_the_cli_run(view_runs: dict[str, Path]) -> None:  # noqa: F811
    run = view_runs["shapes"]
    rows = raw_rows(run)
    summary = run_summary(run)
    rewards = [r["reward"] for r in rows]
    mean = sum(rewards) / len(rewards)
    assert summary["rollouts"]["done"] == 4 == len(rows)
    assert summary["rewards"]["mean"] == pytest.approx(mean)
    assert summary["rewards"]["std"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in rewards) / len(rewards)))
    assert sum(summary["rewards"]["histogram"]["counts"]) == 4
    assert summary["turns"]["total"] == sum(r["turns"] for r in rows)
    assert summary["settings"]["env"] == "shapes" and summary["settings"]["group"] == 2


def test_page_escapes_everything_the_run_holds(view_runs: dict[str, Path]) -> None:  # noqa: F811
    page, _ = render_page(view_runs["hostile"])
    tags = parse(page)
    names = [t for t, _ in tags.tags]
    assert names.count("script") == 2 and names.count("style") == 1  # the page's own, nothing injected
    assert [a.get("type") for t, a in tags.tags if t == "script"] == ["application/json", None]
    assert not [(t, k) for t, a in tags.tags for k in a if k.startswith("on")]  # no event handler attribute
    assert "b" not in names
    assert all(a.get("data-image") and a.get("src") is None for t, a in tags.tags if t == "img")
    text = "".join(tags.text)
    for hostile in (SCRIPT, MARKUP, STYLE, ENV_FAILURE):
        assert hostile in text  # shown as text, character for character
    meta = next(a for t, a in tags.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy")
    assert "default-src 'none'" in (meta["content"] or "") and "img-src data:" in (meta["content"] or "")
    images = json.loads(re.search(r'<script type="application/json" id="rw-images">(.*?)</script>', page)[1])
    assert sorted(images) == sorted(p.stem for p in originals(view_runs["hostile"]))


def test_page_embeds_each_image_once_as_a_bounded_thumbnail(view_runs: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    run = view_runs["hostile"]
    stats = write_page(run, tmp_path / "page.html")
    page = (tmp_path / "page.html").read_text()
    urls = DATA_URL.findall(page)
    assert len(urls) == stats.images == 5  # each unique image once, though a group shares its prompt's images
    for mime, data in urls:
        thumb = Image.open(io.BytesIO(base64.b64decode(data)))
        assert max(thumb.size) == 256 and thumb.format.lower() == mime.removeprefix("image/")
    assert sorted(m for m, _ in urls) == ["image/jpeg"] * 4 + ["image/webp"]  # the RGBA image keeps its alpha
    original_bytes = sum(p.stat().st_size for p in originals(run))
    assert stats.bytes == len(page.encode()) < 600_000 and stats.bytes * 20 < original_bytes  # 1024² noise: ~3 MB each
    small = write_page(run, tmp_path / "small.html", max_side=64)
    assert small.bytes < stats.bytes / 4
    assert all(max(Image.open(io.BytesIO(base64.b64decode(d))).size) == 64
               for _, d in DATA_URL.findall((tmp_path / "small.html").read_text()))


def test_sampled_tokens_show_boundaries_and_logprobs(view_runs: dict[str, Path]) -> None:  # noqa: F811
    run = view_runs["shapes"]
    reader = RunReader(run)
    row = next(reader.rows())
    step = reader.trajectory(row).steps[0]
    page, stats = render_page(run, rollout=row["id"])
    assert stats.tokenizer and stats.shown == 1
    section = page[page.index('<section class="rollout"'):]
    first = section[section.index('<div class="sampled">'):]
    first = first[:first.index("</div>")]
    titles = re.findall(r'<span class="tok [^"]*" title="([^"]*)">', first)
    ids = [int(i) for t in titles for i in re.findall(r"token (\d+)", t)]
    assert ids == list(step.completion_ids)  # every sampled token, in order, in some box
    lps = [float(x) for t in titles for x in re.findall(r"logprob (-?[\d.]+)", t)]
    assert lps == pytest.approx(step.completion_logprobs, abs=1e-4)


def test_tool_calls_and_the_images_tools_return(view_runs: dict[str, Path]) -> None:  # noqa: F811
    run = view_runs["zoom"]
    rows = raw_rows(run)
    page, stats = render_page(run)
    assert stats.turns == sum(r["turns"] for r in rows) == 4
    # Each rollout's picture and its crop (the two crops of the same corner may be the same pixels).
    assert stats.images == len(list(originals(run))) >= 3
    section = page[page.index(f'<h2>{rows[0]["id"]}</h2>'):]
    section = section[:section.index("</section>")]
    assert re.search(r'<div class="call">→ crop\(\{&quot;box&quot;: \[0, 0, 60, 40\]\}\)</div>', section)
    tool = section[section.index('<div class="msg tool">'):]
    assert tool.index("<img") < tool.index("</div></div>")  # the crop is shown inside the tool message
    sampled = [html.unescape(re.sub(r"<[^>]+>", "", m))
               for m in re.findall(r'<div class="sampled">(.*?)</div>', section, re.S)]
    assert sampled == [CROP + "<|im_end|>", ANSWER + "<|im_end|>"]  # the tokens, decoded exactly
    assert section.count('class="tok p') > 0 and 'special" title="token 151645' in section  # <|im_end|>


def test_token_pieces_keep_split_characters_together(tiny) -> None:
    tokenizer = TextTokenizer.from_dir(tiny("qwen2_vl"))
    text = "héllo 世界 🦩 </script> 𓀀 done"
    ids = tokenizer.encode_ids(text)
    pieces = token_pieces(ids, [-0.5] * len(ids), tokenizer.decode)
    assert "".join(p.text for p in pieces) == text
    assert [i for p in pieces for i in p.ids] == ids
    assert "\ufffd" not in "".join(p.text for p in pieces)
    for char in ("🦩", "𓀀"):  # byte-level BPE splits each over 3 tokens, each alone U+FFFD
        piece = next(p for p in pieces if char in p.text)
        assert len(piece.ids) == 3 and all(tokenizer.decode([i]).endswith("\ufffd") for i in piece.ids[1:])
    shown = token_pieces([5, 6], None, lambda ids: "".join(f"[{i}]" for i in ids))
    assert [(p.text, p.logprobs) for p in shown] == [("[5]", (None,)), ("[6]", (None,))]


def test_a_missing_original_shows_a_placeholder(view_runs: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(view_runs["shapes"], run)
    gone = originals(run)[0]
    gone.unlink()
    page, stats = render_page(run)
    assert stats.missing_images == 1 and stats.images == 5
    assert f"image {gone.stem[:16]}: not shown" in page


def test_a_corrupt_rollout_is_shown_as_such(view_runs: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(view_runs["shapes"], run)
    rows = raw_rows(run)
    bad = rows[1]
    with open(run / "shards" / bad["shard"], "r+b") as f:  # flip one byte inside its record: a CRC mismatch
        f.seek(bad["offset"] + 16 + bad["length"] // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    summary = run_summary(run)
    assert summary["rollouts"]["unreadable"] == 1 and summary["rollouts"]["total"] == 4
    page, stats = render_page(run)
    assert stats.shown == 4 and stats.turns == sum(r["turns"] for r in rows) - bad["turns"]
    section = page[page.index(f'<h2>{bad["id"]}</h2>'):]
    assert "cannot read this rollout" in section[:section.index("</section>")] and "CRC mismatch" in section
    empty = CliRunner().invoke(app, ["view", str(tmp_path), "--out", str(tmp_path / "x.html")])
    assert empty.exit_code == 2 and "StoreError" in empty.output and "rollouts.jsonl" in empty.output


def test_the_tokenizer_used_is_the_runs_or_noted(view_runs: dict[str, Path], tiny, tmp_path: Path) -> None:  # noqa: F811
    run = view_runs["zoom"]
    page, stats = render_page(run)
    assert stats.tokenizer and stats.tokenizer_note is None
    other = tmp_path / "other-model"
    shutil.copytree(tiny("qwen2_vl"), other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 7}))
    page, stats = render_page(run, model_dir=other)
    assert stats.tokenizer and "fingerprint differs" in (stats.tokenizer_note or "")
    assert "not the run&#x27;s model" in page
    page, stats = render_page(run, model_dir=tmp_path / "nowhere")
    assert not stats.tokenizer and "no tokenizer.json" in (stats.tokenizer_note or "")
    first = RunReader(run).trajectory(raw_rows(run)[0]).steps[0].completion_ids  # shown as ids, each in a box
    assert "".join(f"[{i}]" for i in first) in re.sub(r"<[^>]+>", "", page)


def test_view_command(view_runs: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    run = view_runs["shapes"]
    out = tmp_path / "sub" / "page.html"
    result = CliRunner().invoke(app, ["view", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text().startswith("<!DOCTYPE html>") and "4 of 4 rollouts" in result.output
    one = CliRunner().invoke(app, ["view", str(run), "--out", str(tmp_path / "one.html"), "--rollout",
                                   "shapes-s0-p1-g0"])
    assert one.exit_code == 0, one.output
    assert (tmp_path / "one.html").read_text().count('<section class="rollout"') == 1
    missing = CliRunner().invoke(app, ["view", str(run), "--out", str(tmp_path / "x.html"), "--rollout", "nope"])
    assert missing.exit_code == 2 and "ViewError" in missing.output and "'nope'" in missing.output
    with pytest.raises(ViewError, match="is a folder"):
        write_page(run, tmp_path)
    assert not (tmp_path / "x.html").exists()


def test_inspect_command(view_runs: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(view_runs["hostile"], run)
    result = CliRunner().invoke(app, ["inspect", str(run)])
    assert result.exit_code == 0, result.output
    assert re.search(r"rollouts total / done / failed\s*│\s*4 / 2 / 2", result.output)
    assert re.search(r"errors: env_error\s*│\s*2", result.output)
    assert re.search(r"images unique / referenced\s*│\s*5 / 14", result.output)
    assert re.search(r"│ 1\.5 +│ 2 +│ █+ *│", result.output)  # the reward histogram: one bin, both done rollouts
    assert json.loads((run / SUMMARY).read_text())["rollouts"]["failed"] == 2
    as_json = CliRunner().invoke(app, ["inspect", str(run), "--json", "--no-write"])
    assert json.loads(as_json.output)["errors"] == {"env_error": 2}


def test_wandb_without_wandb_is_a_typed_error(view_runs: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    try:
        import wandb  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("wandb is installed: this tests the error when it is not")
    with pytest.raises(MissingExtraError, match=r"rollwire\[wandb\]"):
        require_wandb()
    run = tmp_path / "run"
    shutil.copytree(view_runs["shapes"], run)
    (run / SUMMARY).unlink(missing_ok=True)  # the run wrote one when it ended
    result = CliRunner().invoke(app, ["inspect", str(run), "--wandb"])
    assert result.exit_code == 2 and "MissingExtraError" in result.output and "rollwire[wandb]" in result.output
    assert not (run / SUMMARY).exists()  # nothing done before the missing extra was found


def test_histogram_bins() -> None:
    from rollwire.view.summary import histogram

    assert histogram([]) == {"edges": [], "counts": []}
    assert histogram([2.0, 2.0]) == {"edges": [2.0, 2.0], "counts": [2]}
    got = histogram([0.0, 0.0, 0.25, 1.0], bins=4)
    assert got["edges"] == [0.0, 0.25, 0.5, 0.75, 1.0] and got["counts"] == [2, 1, 0, 1]  # the last bin is closed
