"""`rollwire view`: a run directory as one self-contained HTML page (no network: inline CSS and
script, thumbnails as data: URLs, each unique image once), an overview of the run's figures and
every rollout turn by turn.

The page is safe to open whatever the run holds: every value is escaped, the image map is JSON
with `<`, `>` and `&` escaped, and a Content-Security-Policy lets only the page's own style and
script run (by hash) and only data: images load.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from rollwire.errors import StoreError, ViewError
from rollwire.store import RunReader
from rollwire.view.assets import CSP, CSS, JS
from rollwire.view.charts import bar_chart, histogram_labels
from rollwire.view.summary import read_manifest, run_summary
from rollwire.view.thumbs import MAX_SIDE, Thumbnails
from rollwire.view.turns import Decode, turns_html

MAX_ROLLOUTS = 100


@dataclass(frozen=True)
class PageStats:
    bytes: int
    rollouts: int  # in the run
    shown: int  # on the page
    turns: int  # on the page
    images: int  # unique thumbnails embedded
    missing_images: int  # referenced but not archived (shown as placeholders)
    tokenizer: bool  # sampled text decoded (else token ids are shown)
    tokenizer_note: str | None  # why not, or why the decoded text may be wrong


def script_json(value: Any) -> str:
    """JSON that is safe inside <script>: no `</script>`, `<!--` or `&` can appear in it."""
    text = json.dumps(value, ensure_ascii=True, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


@dataclass(frozen=True)
class Decoder:
    """How the page turns token ids into text: `decode` (None: ids are shown) and `note`, which says
    why the text is not shown, or may be wrong (a tokenizer from another model than the run's)."""

    decode: Decode | None
    specials: frozenset[int] = frozenset()
    note: str | None = None


def load_decoder(model_dir: str | Path | None, fingerprint: str | None = None) -> Decoder:
    """The tokenizer.json of `model_dir`; with the run's model `fingerprint`, a model whose
    fingerprint differs is used but noted."""
    if model_dir is None:
        return Decoder(None, note="the run names no model directory (pass --model): tokens are shown as ids")
    if not (Path(model_dir) / "tokenizer.json").is_file():
        return Decoder(None, note=f"{model_dir} has no tokenizer.json (pass --model): tokens are shown as ids")
    from rollwire.render.tokens import TextTokenizer
    from rollwire.rollout.runner import model_fingerprint

    try:
        tokenizer = TextTokenizer.from_dir(model_dir)
    except Exception as exc:  # tokenizers raises plain Exceptions: show ids, and say why
        return Decoder(None, note=f"{model_dir}/tokenizer.json cannot be read ({type(exc).__name__}: {exc}): "
                                  "tokens are shown as ids")
    specials = frozenset(int(i) for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special)
    note = None
    if fingerprint is not None and model_fingerprint(model_dir) != fingerprint:
        note = f"{model_dir} is not the run's model (its fingerprint differs): the decoded text may be wrong"
    return Decoder(tokenizer.decode, specials, note)


def _figures_html(summary: Mapping[str, Any]) -> str:
    r, t, tok, img = summary["rollouts"], summary["turns"], summary["tokens"], summary["images"]
    rw = summary["rewards"]

    def num(v: Any) -> str:
        return "–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    rows = [("rollouts done / failed", f"{r['done']} / {r['failed']}"),
            ("rows superseded by a retry", r["superseded_rows"]),
            ("rollouts unreadable (corrupt shard record)", r["unreadable"]),
            ("turns (mean per rollout)", f"{t['total']} ({num(t['mean'])})"),
            ("prompt / completion tokens", f"{tok['prompt']} / {tok['completion']}"),
            ("mean completion logprob", num(tok["completion_logprob_mean"])),
            ("reward mean ± std (min … max)", f"{num(rw['mean'])} ± {num(rw['std'])} "
                                             f"({num(rw['min'])} … {num(rw['max'])})"),
            ("images unique / referenced", f"{img['unique']} / {img['referenced']}"),
            ("bridge successes / attempts", f"{summary['bridge']['successes']} / {summary['bridge']['attempts']}")]
    rows += [(f"finish: {k}", v) for k, v in summary["finish"].items()]
    rows += [(f"full render: {k}", v) for k, v in summary["full_render"].items()]
    body = "".join(f"<tr><th>{escape(str(k))}</th><td>{escape(str(v))}</td></tr>" for k, v in rows)
    return f'<div class="card"><h3>figures</h3><table>{body}</table></div>'


def overview_html(summary: Mapping[str, Any], manifest: Mapping[str, Any] | None) -> str:
    hist = summary["rewards"]["histogram"]
    per = summary["turns"]["per_rollout"]
    errors = summary["errors"]
    cards = [_figures_html(summary),
             bar_chart("reward per rollout (no error)", histogram_labels(hist["edges"]), hist["counts"]),
             bar_chart("turns per rollout", list(per), list(per.values()))]
    err_rows = "".join(f"<tr><td>{escape(k)}</td><td>{v}</td></tr>" for k, v in errors.items())
    cards.append('<div class="card"><h3>errors by kind</h3>'
                 + (f"<table><tr><th>kind</th><th>rollouts</th></tr>{err_rows}</table>" if errors else "none")
                 + "</div>")
    out = f'<div class="grid">{"".join(cards)}</div>'
    if manifest is not None:
        out += (f'<details class="card"><summary>run manifest (run.json)</summary>'
                f"<pre>{escape(json.dumps(manifest, indent=2, ensure_ascii=False))}</pre></details>")
    return out


def _index_html(rows: list[dict[str, Any]]) -> str:
    head = "<tr><th>rollout</th><th>prompt / sample</th><th>reward</th><th>turns</th><th>finish</th><th>error</th></tr>"
    body = []
    for row in rows:
        err = row.get("error") if isinstance(row.get("error"), Mapping) else None
        body.append(f'<tr><td><a href="#{escape(_anchor(row["id"]))}">{escape(row["id"])}</a></td>'
                    f'<td>{escape(str(row.get("prompt_index")))} / {escape(str(row.get("sample_index")))}</td>'
                    f'<td>{escape(str(row.get("reward")))}</td><td>{escape(str(row.get("turns")))}</td>'
                    f'<td>{escape(str(row.get("finish")))}</td>'
                    f'<td>{escape(str(err.get("kind"))) if err else ""}</td></tr>')
    return f"<table>{head}{''.join(body)}</table>"


def _anchor(rollout_id: str) -> str:
    return "rollout-" + "".join(c if c.isalnum() or c in "-_." else f"~{ord(c):x}" for c in rollout_id)


def _rollout_html(reader: RunReader, row: dict[str, Any], thumbs: Thumbnails, decode: Decode | None,
                  specials: Collection[int]) -> tuple[str, int]:
    meta = " · ".join(f"{k} {row.get(k)}" for k in ("env", "prompt_index", "sample_index", "seed", "reward", "finish"))
    head = (f'<section class="rollout" id="{escape(_anchor(row["id"]))}"><h2>{escape(row["id"])}</h2>'
            f'<div class="meta">{escape(meta)} · rewards {escape(json.dumps(row.get("rewards")))}</div>')
    err = row.get("error")
    if isinstance(err, Mapping):
        head += (f'<div class="error">{escape(str(err.get("kind")))} at step {escape(str(err.get("step")))}: '
                 f'{escape(str(err.get("message")))}</div>')
    try:
        trajectory = reader.trajectory(row)
    except StoreError as exc:
        return head + f'<div class="error">cannot read this rollout: {escape(str(exc))}</div></section>', 0
    if trajectory.tools:
        tools = escape(json.dumps(trajectory.tools, indent=1, ensure_ascii=False))
        head += f"<details><summary>tools</summary><pre>{tools}</pre></details>"
    return head + turns_html(trajectory, thumbs, decode, specials) + "</section>", len(trajectory.steps)


def render_page(run_dir: str | Path, *, rollout: str | None = None, max_rollouts: int = MAX_ROLLOUTS,
                model_dir: str | Path | None = None, max_side: int = MAX_SIDE) -> tuple[str, PageStats]:
    """The page's HTML and what it holds. `rollout` shows that rollout alone (a ViewError if the run
    has no such id); otherwise the first `max_rollouts` rollouts by (prompt, sample)."""
    reader = RunReader(run_dir)
    summary = run_summary(run_dir, reader)
    manifest = read_manifest(run_dir)
    rows = sorted(reader.rows(), key=lambda r: (_sortable(r.get("prompt_index")), _sortable(r.get("sample_index"))))
    if rollout is not None:
        shown = [r for r in rows if r["id"] == rollout]
        if not shown:
            raise ViewError(f"{run_dir} has no rollout {rollout!r} (it has {len(rows)}, e.g. "
                            f"{', '.join(r['id'] for r in rows[:3]) or 'none'})")
    else:
        shown = rows[:max_rollouts]
    about = (manifest or {}).get("about") or {}
    settings_model = ((manifest or {}).get("settings") or {}).get("model") or {}
    fingerprint = settings_model.get("fingerprint") if isinstance(settings_model, Mapping) else None
    decoder = load_decoder(model_dir or about.get("model_dir"), fingerprint if isinstance(fingerprint, str) else None)
    decode, specials = decoder.decode, decoder.specials
    thumbs = Thumbnails(reader, max_side)
    sections, turns = [], 0
    for row in shown:
        html, n = _rollout_html(reader, row, thumbs, decode, specials)
        sections.append(html)
        turns += n
    note = "" if len(shown) == len(rows) or rollout is not None else (
        f'<p class="meta">showing {len(shown)} of {len(rows)} rollouts (--rollout ID shows one, '
        "--max-rollouts more)</p>")
    if decoder.note:
        note += f'<p class="error">{escape(decoder.note)}</p>'
    images = {k: v for k, v in thumbs.urls.items() if v is not None}
    title = f"rollwire run {Path(run_dir).resolve().name}"
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{escape(CSP)}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{escape(title)}</h1>"
            f'<div class="meta">{escape(str(Path(run_dir).resolve()))}</div><div id="rw-status"></div>'
            f"{overview_html(summary, manifest)}<h3>rollouts</h3>{note}{_index_html(shown)}{''.join(sections)}"
            f'<script type="application/json" id="rw-images">{script_json(images)}</script>'
            f"<script>{JS}</script></body></html>\n")
    stats = PageStats(bytes=len(page.encode()), rollouts=len(rows), shown=len(shown), turns=turns,
                      images=len(images), missing_images=len(thumbs.missing), tokenizer=decode is not None,
                      tokenizer_note=decoder.note)
    return page, stats


def _sortable(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, int) and not isinstance(value, bool) else (1, str(value))


def write_page(run_dir: str | Path, out: str | Path, **options: Any) -> PageStats:
    """Render the page (see `render_page`) and write it to `out` (a file; its folder is created)."""
    out = Path(out)
    if out.is_dir():
        raise ViewError(f"--out {out} is a folder; give a file name such as {out / 'page.html'}")
    page, stats = render_page(run_dir, **options)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, out)
    except OSError as exc:
        raise ViewError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return stats
