"""`rollwire bench wire`: request bytes of one 32-turn rollout, one new image per turn, per wire mode.

- float32 features, every image every turn (the seed's sidecar: normalised pixels resent);
- uint8 features, every image every turn;
- content_parts resent every turn (verifiers 0.4.0 through renderers 0.1.12's client: each
  image's data URL, as the environment gave it, in every request);
- rollwire features: each image's uint8 patches once, later turns by id;
- rollwire content_parts: each image's encoded bytes once, later turns by uuid.

Bytes are whole JSON request bodies (token ids included; they are resent by every mode), and the
image data in them. References: the encoded images once (JPEG q90 for photos, PNG for noise, as
an environment would hand them over) and the uint8 patches once.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any

from rollwire.bench.images import encoded, noise, photo
from rollwire.bench.report import Report, Table
from rollwire.engines.types import GenerateRequest, SamplingParams
from rollwire.engines.wire import features_payload, generate_body
from rollwire.features import PixelFormat
from rollwire.render import create_renderer
from rollwire.render.types import ImageRef
from rollwire.tiny_model import ensure_tiny_model

TURNS, QUICK_TURNS = 32, 4
SIDE, QUICK_SIDE = 448, 112
ANSWER = "The square moved to the left."


def _content_parts_builder() -> Any:
    """The `wire` branch's content_parts body builder, when it is on this tree (else None)."""
    try:
        from rollwire.engines import content_parts
    except ImportError:
        return None
    return getattr(content_parts, "content_parts", None)


def _collapse(token_ids: list[int], refs: Sequence[ImageRef], pad_id: int) -> list[int]:
    """The prompt with each image's pad run as one pad (what a content_parts request carries)."""
    out, at = [], 0
    for ref in sorted(refs, key=lambda r: r.offset):
        out += [*token_ids[at:ref.offset], pad_id]
        at = ref.end
    return out + token_ids[at:]


def _data_url(data: bytes, fmt: str) -> str:
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(data).decode("ascii")


def rollout_bytes(kind: str, turns: int, side: int) -> dict[str, Any]:
    renderer: Any = create_renderer(ensure_tiny_model("qwen2_vl"))
    store = renderer.feature_store
    tok = renderer.tokenizer
    completion = [*tok.encode_ids(ANSWER), renderer.im_end_id]
    fmt = "JPEG" if kind == "photo" else "PNG"
    make = photo if kind == "photo" else noise
    urls: list[str] = []
    totals = dict.fromkeys(("float32_all", "uint8_all", "content_parts_all", "features_once", "content_parts_once"), 0)
    images = dict.fromkeys(totals, 0)
    encoded_once = patches_once = urls_once = 0
    held: set[str] = set()
    prompt = None
    builder = _content_parts_builder()
    sampling = SamplingParams(max_tokens=64, stop_token_ids=renderer.stop_token_ids)
    for k in range(turns):
        image = make(side, side, seed=k)
        data = encoded(image, fmt)
        encoded_once += len(data)
        urls.append(_data_url(data, fmt))
        urls_once += len(urls[-1])
        message = {"role": "user", "content": [{"type": "image", "image": image},
                                               {"type": "text", "text": f"Turn {k}: what changed?"}]}
        prompt = renderer.render([message]) if prompt is None else renderer.bridge(prompt, completion, [message]).tokens
        assert prompt is not None
        refs = prompt.images
        patches_once += store.get(refs[-1].id).pixel_values.nbytes
        request = GenerateRequest(prompt_token_ids=prompt.token_ids, images=refs, sampling=sampling)
        modes: tuple[tuple[str, PixelFormat, set[str]], ...] = (
            ("float32_all", "float32", set()), ("uint8_all", "uint8", set()), ("features_once", "uint8", held))
        for mode, fmt_px, skip in modes:
            payload, nbytes = features_payload(refs, store, pixel_format=fmt_px, by_id_only=skip)
            totals[mode] += len(generate_body(request, model="m", features=payload))
            images[mode] += nbytes
        # content_parts: the prompt carries one pad per image; the server expands it.
        ids_json = len(json.dumps(_collapse(prompt.token_ids, refs, renderer.image_pad_id)))
        resent = sum(len(u) for u in urls)
        parts_json = sum(len(json.dumps({"type": "image_url", "url": u})) for u in urls)
        base = len(generate_body(GenerateRequest(prompt_token_ids=[], images=(), sampling=sampling), model="m",
                                 features=None))
        totals["content_parts_all"] += base + ids_json + parts_json + len(', "return_token_ids": true')
        images["content_parts_all"] += resent
        if builder is not None:
            parts, nbytes = builder(refs, store, by_id_only=held)
            from msgspec import json as mjson

            body = base + ids_json + len(mjson.encode(parts)) + len(', "return_token_ids": true')
        else:  # computed: the new image's encoded bytes once, earlier ones by uuid
            nbytes = len(urls[-1])
            uuids = sum(len(json.dumps({"type": "image_url", "uuid": r.id})) for r in refs[:-1])
            body = base + ids_json + len(json.dumps({"type": "image_url", "url": urls[-1], "uuid": refs[-1].id})) \
                + uuids + len(', "return_token_ids": true')
        totals["content_parts_once"] += body
        images["content_parts_once"] += nbytes
        held.add(refs[-1].id)
    return {"body_bytes": totals, "image_bytes": images, "encoded_once": encoded_once, "patches_once": patches_once,
            "data_urls_once": urls_once,
            "content_parts": ("built by rollwire.engines.content_parts" if builder
                              else "computed (no builder on this tree)")}


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def run(quick: bool = False) -> Report:
    turns, side = (QUICK_TURNS, QUICK_SIDE) if quick else (TURNS, SIDE)
    table = Table(["images", "mode", "request bytes", "image bytes", "× encoded once", "× data URLs once",
                   "× uint8 patches once"])
    figures: dict[str, Any] = {}
    labels = {"float32_all": "float32 features, every image every turn (seed sidecar)",
              "uint8_all": "uint8 features, every image every turn",
              "content_parts_all": "content_parts resent every turn (verifiers 0.4.0)",
              "features_once": "rollwire features (each image once, then by id)",
              "content_parts_once": "rollwire content_parts (each image once, then by uuid)"}
    notes = []
    for kind in ("noise", "photo"):
        r = rollout_bytes(kind, turns, side)
        figures[kind] = r
        for mode, label in labels.items():
            img = r["image_bytes"][mode]
            table.add(kind, label, _mib(r["body_bytes"][mode]), _mib(img), f"{img / r['encoded_once']:.2f}×",
                      f"{img / r['data_urls_once']:.2f}×", f"{img / r['patches_once']:.2f}×")
        r["content_parts_vs_encoded_once"] = r["image_bytes"]["content_parts_once"] / r["encoded_once"]
        r["content_parts_vs_data_urls_once"] = r["image_bytes"]["content_parts_once"] / r["data_urls_once"]
        r["features_vs_patches_once"] = r["image_bytes"]["features_once"] / r["patches_once"]
        notes.append(f"{kind}: encoded images once {_mib(r['encoded_once'])} ({_mib(r['data_urls_once'])} as base64 "
                     f"data URLs), uint8 patches once "
                     f"{_mib(r['patches_once'])}; rollwire content_parts {r['content_parts']}.")
    cp = max(figures[k]["content_parts_vs_encoded_once"] for k in figures)
    cp_url = max(figures[k]["content_parts_vs_data_urls_once"] for k in figures)
    ft = max(figures[k]["features_vs_patches_once"] for k in figures)
    return Report(
        name="wire", command="rollwire bench wire" + (" --quick" if quick else ""),
        summary=(f"{turns} turns of {side}² images: rollwire features {ft:.3f}× the uint8 patches once "
                 "(target ≤ 1.36×), "
                 f"content_parts {cp:.3f}× the encoded images once (target ≤ 1.05×), {cp_url:.3f}× their base64 data "
                 "URLs once (JSON carries base64: 4/3 is the least a JSON body can do)."),
        tables=[table],
        notes=[*notes, "Photos are photo-like pictures (gradients, soft shapes, grain) saved as JPEG q90; noise "
               "as PNG. "
               "Request bytes are the JSON bodies summed over the turns; image bytes the base64 image data in them."],
        figures={"turns": turns, "side": side, "images": figures, "content_parts_vs_encoded_once": cp,
                 "content_parts_vs_data_urls_once": cp_url,
                 "features_vs_patches_once": ft},
    )
