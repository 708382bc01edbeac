"""`rollwire bench wire`: request bytes of one 32-turn rollout, one new image per turn, per wire mode.

- float32 features, every image every turn (the seed's sidecar: normalised pixels resent);
- uint8 features, every image every turn;
- content_parts resent every turn (verifiers 0.4.0 through renderers 0.1.12's client: each
  image's data URL, as the environment gave it, in every request);
- rollwire features: each image's uint8 patches once, later turns by id;
- rollwire content_parts: each image's original encoded bytes once, later turns by uuid (what goes
  to a server found to process such images as rollwire does: vLLM 0.32 for images that need no
  resize, as here; with `use_fast: false` for all), and the resized PNG once (what goes to a server
  that processes them differently).

Bytes are whole JSON request bodies (token ids included; they are resent by every mode), and the
image data in them. References: the encoded images once (JPEG q90 for photos, PNG for noise, as
an environment would hand them over) and the uint8 patches once.
"""

from __future__ import annotations

import base64
from typing import Any

import msgspec

from rollwire.bench.images import encoded, noise, photo
from rollwire.bench.report import Report, Table
from rollwire.engines.content_parts import Original, collapse, request_body
from rollwire.engines.types import GenerateRequest, SamplingParams
from rollwire.engines.vllm_wire import ContentPart
from rollwire.engines.wire import features_payload, generate_body
from rollwire.features import PixelFormat
from rollwire.render import create_renderer
from rollwire.tiny_model import ensure_tiny_model

TURNS, QUICK_TURNS = 32, 4
SIDE, QUICK_SIDE = 448, 112
ANSWER = "The square moved to the left."


def _accept_all(_: Original) -> bool:
    """A server whose processing of every kind of image was checked equal to rollwire's."""
    return True


def _data_url(data: bytes, fmt: str) -> str:
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(data).decode("ascii")


def rollout_bytes(kind: str, turns: int, side: int) -> dict[str, Any]:
    renderer: Any = create_renderer(ensure_tiny_model("qwen2_vl"))
    store = renderer.feature_store
    store.keep_encoded = True  # as a content_parts engine asks: the originals stay beside the features
    tok = renderer.tokenizer
    completion = [*tok.encode_ids(ANSWER), renderer.im_end_id]
    fmt = "JPEG" if kind == "photo" else "PNG"
    make = photo if kind == "photo" else noise
    urls: list[str] = []
    totals = dict.fromkeys(("float32_all", "uint8_all", "content_parts_all", "features_once", "content_parts_once",
                            "content_parts_png"), 0)
    images = dict.fromkeys(totals, 0)
    encoded_once = patches_once = urls_once = 0
    held: set[str] = set()
    prompt = None
    sampling = SamplingParams(max_tokens=64, stop_token_ids=renderer.stop_token_ids)
    for k in range(turns):
        image = make(side, side, seed=k)
        data = encoded(image, fmt)
        encoded_once += len(data)
        urls.append(_data_url(data, fmt))
        urls_once += len(urls[-1])
        message = {"role": "user", "content": [{"type": "image", "image": urls[-1]},
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
        one_pad = collapse(prompt.token_ids, refs, renderer.image_pad_id)
        short = msgspec.structs.replace(request, prompt_token_ids=one_pad)
        resent = [ContentPart("image_url", url=u) for u in urls]  # verifiers: every image, no uuid
        totals["content_parts_all"] += len(generate_body(short, model="m", features=None, content_parts=resent,
                                                         return_token_ids=True))
        images["content_parts_all"] += sum(len(u) for u in urls)
        for mode, accepts in (("content_parts_once", _accept_all), ("content_parts_png", None)):
            body, nbytes = request_body(request, store, model="m", pad_id=renderer.image_pad_id, by_id_only=held,
                                        accepts=accepts)
            totals[mode] += len(body)
            images[mode] += nbytes
        held.add(refs[-1].id)
    return {"body_bytes": totals, "image_bytes": images, "encoded_once": encoded_once, "patches_once": patches_once,
            "data_urls_once": urls_once}


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
              "content_parts_once": "rollwire content_parts (each original once, then by uuid)",
              "content_parts_png": "rollwire content_parts, server processes differently (resized PNG once)"}
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
                     f"{_mib(r['patches_once'])}.")
    cp = max(figures[k]["content_parts_vs_encoded_once"] for k in figures)
    cp_url = max(figures[k]["content_parts_vs_data_urls_once"] for k in figures)
    ft = max(figures[k]["features_vs_patches_once"] for k in figures)
    return Report(
        name="wire", command="rollwire bench wire" + (" --quick" if quick else ""),
        summary=(f"{turns} turns of {side}² images: rollwire features {ft:.3f}× the uint8 patches once "
                 f"(target ≤ 1.36×), content_parts {cp_url:.3f}× the encoded images once as data URLs, what "
                 f"verifiers sends once (target ≤ 1.05×; {cp:.3f}× their raw bytes: JSON carries base64, 4/3 is the "
                 "least a JSON body can do). To a server whose processing differs from rollwire's (vLLM's default "
                 "torchvision processor for images that need a resize) the resized PNG goes instead: see its rows."),
        tables=[table],
        notes=[*notes, "Photos are photo-like pictures (gradients, soft shapes, grain) saved as JPEG q90; noise "
               "as PNG; the conversation carries them as data URLs, as an environment hands them over. "
               "Request bytes are the JSON bodies summed over the turns (rollwire's as its client builds them); "
               "image bytes the base64 image data in them. The originals row is what goes to a server that was "
               "checked (once per image kind) to process them bit for bit as rollwire does; 448² needs no resize, "
               "so vLLM 0.32 with its default processor is such a server here."],
        figures={"turns": turns, "side": side, "images": figures, "content_parts_vs_encoded_once": cp,
                 "content_parts_vs_data_urls_once": cp_url,
                 "features_vs_patches_once": ft},
    )
