"""`rollwire bench render`: what building turn T's prompt costs, at T = 4 .. 64, one new image per turn.

- rollwire: `renderer.bridge` (previous prompt + completion + the new message only);
- HF: `processor.apply_chat_template(tokenize=True)` over the whole conversation (every image
  processed again: the re-render each turn that most stacks do);
- renderers 0.1.12 (the seed library): `Qwen3VLRenderer.bridge_to_next_turn` on the same tokenizer
  and HF image processor, when it is importable (timing only: its template is Qwen3-VL's);
- floor: resize the new image + one copy of its rows (held for the run, as rollwire's store holds
  its rows) + one tokenizer call over the new message's text (what any renderer must do; no
  hashing, no checks);
- rollwire on its numpy paths: the same bridge with the compiled extension off
  (`rollwire.features._simd`: what a machine without it, or without AVX2, runs), on a picture of
  its own, over the floor's time on the same turn's picture.

Each repetition brings new pictures (a feature-store miss, like a real turn): rollwire and the
baselines time the same one, the floor one of its own, and rollwire and the floor run back to
back in alternating order (a side that always went second would find the picture, or the rows it
copies, still in cache), so load on the shared machine falls on each alike.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from rollwire.bench.images import photo
from rollwire.bench.report import Report, Table, cpu_clock
from rollwire.features import pixels as view
from rollwire.features.qwen_vl import smart_resize
from rollwire.render import create_renderer
from rollwire.render.tokens import TextTokenizer
from rollwire.tiny_model import ensure_tiny_model

TURNS = (4, 8, 16, 32, 64)
QUICK_TURNS = (2, 4)
SIDE = (640, 480)
QUICK_SIDE = (160, 120)
WARMUP = 5  # untimed turns before the first timed one
ANSWER = "The red square moved to the left and is a little smaller than before."


def user(k: int, side: tuple[int, int]) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "image", "image": photo(*side, seed=k)},
                                        {"type": "text", "text": f"Turn {k}: what changed since the last picture?"}]}


def hf_processor(model_dir: Any) -> tuple[Any, str]:
    try:
        from transformers import AutoProcessor
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        processor = AutoProcessor.from_pretrained(str(model_dir))
        processor.image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(model_dir))
        return processor, ""
    except Exception as exc:  # transformers or torchvision missing: the column says why
        return None, f"HF processor unavailable: {type(exc).__name__}: {exc}"


def seed_renderer(model_dir: Any, processor: Any) -> tuple[Any, str]:
    try:
        import renderers  # the seed library, renderers==0.1.12 (scripts/setup_baselines.sh)
        from transformers import AutoTokenizer
    except ImportError:
        return None, ("renderers 0.1.12 not importable here: run scripts/setup_baselines.sh and this command "
                      "with .venv-baselines/bin/python")
    if processor is None:
        return None, "renderers needs the HF processor"
    return renderers.Qwen3VLRenderer(AutoTokenizer.from_pretrained(str(model_dir)), processor=processor), ""


class _Recorder:
    """Records the strings a tokenizer is asked to encode (the floor tokenizes the same text once)."""

    def __init__(self, tok: TextTokenizer) -> None:
        self.tok, self.texts = tok, list[str]()
        self._encode = tok.encode

    def __enter__(self) -> _Recorder:
        def encode(text: str) -> Any:
            self.texts.append(text)
            return self._encode(text)

        self.tok.encode = encode  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        del self.tok.encode


class _NumpyPaths:
    """The compiled extension off for the block: rollwire's numpy, PIL and ctypes paths."""

    def __enter__(self) -> None:
        self.saved = view.COMPILED
        view.COMPILED = None

    def __exit__(self, *exc: object) -> None:
        view.COMPILED = self.saved


def _timed(fn: Callable[[], object], kept: list[object]) -> float:
    t = cpu_clock()
    kept.append(fn())
    return cpu_clock() - t


def _floor(image: Any, size: tuple[int, int], resample: int, pixels: np.ndarray, tok: TextTokenizer,
           texts: list[str], held: list[np.ndarray]) -> object:
    """Resize the new image, copy its rows once, tokenize the new text once.

    Each side keeps what it keeps: the resized image is dropped, as a processor drops it, and the
    rows are held for the whole run (`held`), as rollwire's feature store holds its rows. Rows that
    were dropped would hand the next turn's copy pages already mapped, a saving no renderer gets:
    its rows live until they are sent.
    """
    image.resize(size, resample)
    rows = np.copy(pixels)
    held.append(rows)
    return rows, [tok.backend.encode(t, add_special_tokens=False) for t in texts]


def run(quick: bool = False) -> Report:
    model_dir = ensure_tiny_model("qwen2_vl")
    renderer: Any = create_renderer(model_dir)
    processor, hf_why = hf_processor(model_dir)
    seed, seed_why = seed_renderer(model_dir, processor)
    side = QUICK_SIDE if quick else SIDE
    turns = QUICK_TURNS if quick else TURNS
    reps = 2 if quick else 16  # rollwire and the floor (even: each first as often); the slow baselines: the first few
    baseline_reps = 2 if quick else 5
    store = renderer.feature_store
    assert store is not None
    config: Any = store.config
    resample = int(getattr(config, "resample", 3))
    new_h, new_w = smart_resize(side[1], side[0], config.factor, config.min_pixels, config.max_pixels)
    tok = renderer.tokenizer
    completion = [*tok.encode_ids(ANSWER), renderer.im_end_id]

    compiled = shuffles.level() if (shuffles := view.simd()) is not None else None
    table = Table(["T", "rollwire ms", "floor ms", "rollwire / floor", "numpy paths / floor", "HF re-render ms",
                   "HF / rollwire", "renderers 0.1.12 ms", "renderers / rollwire"])
    figures: dict[str, dict[str, float | None]] = {}
    history = [user(0, side)]
    prompt = renderer.render(history)
    seed_prompt = seed.render(history, add_generation_prompt=True).token_ids if seed else None
    done = 1
    floor_rows: list[np.ndarray] = []  # the floor's rows, held for the run as the store holds rollwire's
    for w in range(WARMUP if not quick else 1):  # untimed: the first turns of a process pay its allocator's growth
        new = user(5_000 + w, side)
        with _Recorder(tok) as rec:
            warm = renderer.bridge(prompt, completion, [new]).tokens
        assert warm is not None
        texts, rows = list(rec.texts), store.get(warm.images[-1].id).pixel_values
        _floor(new["content"][0]["image"], (new_w, new_h), resample, rows, tok, texts, floor_rows)
    for T in turns:
        while done < T - 1:  # grow the conversation to T - 1 turns (untimed)
            new = user(done, side)
            prompt = renderer.bridge(prompt, completion, [new]).tokens
            if seed:
                seed_prompt = seed.bridge_to_next_turn(seed_prompt, completion, [new]).token_ids
            history += [{"role": "assistant", "content": ANSWER}, new]
            done += 1
        samples: dict[str, list[float]] = {"rollwire": [], "floor": [], "numpy": [], "hf": [], "seed": []}
        kept: list[object] = []
        for r in range(reps):
            new = user(10_000 + 100 * T + r, side)
            # The floor's turn: its own new picture, the rows and texts of rollwire's previous turn (the same
            # shape and length); the order alternates, so neither side always finds the other's work in cache.
            floor = partial(_floor, user(20_000 + 100 * T + r, side)["content"][0]["image"], (new_w, new_h),
                            resample, rows, tok, texts, floor_rows)
            if r % 2:
                samples["floor"].append(_timed(floor, kept))
            at = len(kept)
            with _Recorder(tok) as rec:
                samples["rollwire"].append(_timed(partial(renderer.bridge, prompt, completion, [new]), kept))
            if not r % 2:
                samples["floor"].append(_timed(floor, kept))
            bridged = kept[at].tokens  # type: ignore[attr-defined]
            texts, rows = list(rec.texts), store.get(bridged.images[-1].id).pixel_values
            if compiled:
                with _NumpyPaths():
                    other = user(30_000 + 100 * T + r, side)
                    samples["numpy"].append(_timed(partial(renderer.bridge, prompt, completion, [other]), kept))
            if processor is not None and r < baseline_reps and (T <= 32 or r < 2):
                conversation = [*history, {"role": "assistant", "content": ANSWER}, new]
                samples["hf"].append(_timed(partial(processor.apply_chat_template, conversation, tokenize=True,
                                                    return_dict=True, return_tensors="np",
                                                    add_generation_prompt=True), kept))
            if seed is not None and r < baseline_reps:
                samples["seed"].append(_timed(partial(seed.bridge_to_next_turn, seed_prompt, completion, [new]),
                                              kept))
            kept.clear()
        ms = {k: statistics.median(v) * 1e3 if v else None for k, v in samples.items()}
        ours, fl, hf, sd = ms["rollwire"], ms["floor"], ms["hf"], ms["seed"]
        assert ours is not None and fl is not None
        # each turn's rollwire time over the floor's on the same picture, timed back to back: a burst of
        # load on the shared machine falls on both sides of the ratio
        vs_floor = statistics.median(a / b for a, b in zip(samples["rollwire"], samples["floor"], strict=True))
        numpy_vs = (statistics.median(a / b for a, b in zip(samples["numpy"], samples["floor"], strict=True))
                    if samples["numpy"] else None)
        table.add(T, f"{ours:.2f}", f"{fl:.2f}", f"{vs_floor:.2f}×", f"{numpy_vs:.2f}×" if numpy_vs else "—",
                  f"{hf:.1f}" if hf else "—",
                  f"{hf / ours:.1f}×" if hf else "—", f"{sd:.2f}" if sd else "—", f"{sd / ours:.2f}×" if sd else "—")
        figures[str(T)] = {"rollwire_ms": ours, "floor_ms": fl, "hf_ms": hf, "renderers_ms": sd,
                           "rollwire_vs_floor": vs_floor, "numpy_paths_vs_floor": numpy_vs,
                           "hf_vs_rollwire": hf / ours if hf else None,
                           "renderers_vs_rollwire": sd / ours if sd else None}
    worst = max(f["rollwire_vs_floor"] or 0.0 for f in figures.values())
    notes = [f"{side[0]}×{side[1]} photo-like pictures (resized to {new_w}×{new_h}), one per user turn, on the tiny "
             f"Qwen2-VL model's tokenizer and processor; medians of {reps} turns per T ({baseline_reps} for the "
             f"baselines), each with a new picture, after {WARMUP} untimed turns; rollwire / floor is the median of "
             "each turn's ratio (both timed back to back, each on a new picture of its own, in alternating "
             "order). Both keep their rows for the whole run "
             "(rollwire's in its feature store); neither keeps the resized image. rollwire's cost includes the BLAKE3 "
             "image id; the floor's does not. Times are the thread's CPU time (other jobs on the shared machine do "
             "not count).",
             (f"rollwire's byte shuffles ran compiled ({compiled}, rollwire.features._simd); numpy paths / floor is "
              "the same bridge with the extension off, on a picture of its own, over the floor's time on the turn's "
              "picture." if compiled else "The compiled extension is not built or this CPU has neither AVX-512 "
              "VBMI nor AVX2: rollwire ran its numpy paths.")]
    notes += [why for why in (hf_why, seed_why) if why]
    return Report(
        name="render", command="rollwire bench render" + (" --quick" if quick else ""),
        summary=(f"per-turn prompt cost at worst {worst:.2f}× the floor (target ≤ 1.2×), flat in T; the HF re-render "
                 "grows with T."),
        tables=[table], notes=notes, figures={"turns": figures, "worst_rollwire_vs_floor": worst,
                                              "hf": not hf_why, "renderers": not seed_why, "compiled": compiled},
    )
