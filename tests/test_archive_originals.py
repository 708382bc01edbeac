"""The run directory archives each original as it was given: an encoded file (path, bytes, file or
data URL, http) keeps its bytes under the extension of its real format, a PIL image goes as
lossless TIFF; both (and older runs' PNGs) read back to the same pixels and the same id, a file
changed since it was rendered is refused, and a changed archive is an `ImageReloadError`."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conftest import make_image
from rollwire.bench.instant import Instant
from rollwire.errors import ImageReloadError, StoreError
from rollwire.features import FeatureStore, VisionConfig
from rollwire.images import ImageLimits, load_image
from rollwire.messages import ImagePart, Message, TextPart
from rollwire.render import create_renderer
from rollwire.rollout import EnvStep, Observation, RolloutConfig, run_rollout
from rollwire.store import RunReader, RunWriter
from rollwire.transport.codec import decode, encode, encode_parts


def encoded(image: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def store(tiny: Callable[[str], Path]) -> FeatureStore:
    return FeatureStore(VisionConfig.from_pretrained(tiny("qwen2_vl")))


def archive(writer: RunWriter, source: Any) -> tuple[str, Path]:
    """Render-time features of `source`, then archive it as a rollout does and flush (the blobs are
    in place once a rollout using them commits, or flushed); (id, original's path)."""
    features = writer.features.get_or_process(source)
    path = Path(writer.archive_image(features.id, source, features))
    writer.flush()
    return features.id, path


SOURCES: dict[str, Callable[[Path, bytes], tuple[Any, str]]] = {
    # name -> (source naming a JPEG/WebP/PNG file, the extension it must be archived under)
    "jpeg bytes": lambda d, jpg: (jpg, "jpg"),
    "jpeg path": lambda d, jpg: (str(_file(d / "a.jpg", jpg)), "jpg"),
    "jpeg named .png": lambda d, jpg: (_file(d / "liar.png", jpg), "jpg"),  # its real format names it
    "file url": lambda d, jpg: (_file(d / "b.jpeg", jpg).as_uri(), "jpg"),
    "data url": lambda d, jpg: ("data:image/jpeg;base64," + base64.b64encode(jpg).decode(), "jpg"),
}


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", list(SOURCES))
def test_an_encoded_original_is_archived_byte_for_byte(store: FeatureStore, tmp_path: Path, name: str) -> None:
    jpg = encoded(make_image(64, 48, seed=3), "JPEG", quality=80)
    source, ext = SOURCES[name](tmp_path, jpg)
    with RunWriter(tmp_path / "run", store) as writer:
        image_id, path = archive(writer, source)
        assert path == tmp_path / "run" / "blobs" / image_id[:2] / f"{image_id}.{ext}"
        assert path.read_bytes() == jpg  # the file as given, not decoded and encoded again
        assert store.get_or_process(writer.restore_image(image_id)).id == image_id
        assert archive(writer, source)[1] == path  # idempotent: found, not written twice
    reader = RunReader(tmp_path / "run")
    assert np.array_equal(np.asarray(reader.image(image_id)), np.asarray(load_image(jpg)))
    assert reader.original_path(image_id) == path


def test_a_pil_image_is_archived_as_lossless_tiff(store: FeatureStore, tmp_path: Path) -> None:
    image = make_image(64, 48, mode="RGBA", seed=4)
    with RunWriter(tmp_path, store) as writer:
        image_id, path = archive(writer, image)
        assert path.suffix == ".tiff" and Image.open(path).format == "TIFF"
        back = writer.restore_image(image_id)
        assert back.mode == "RGBA" and np.array_equal(np.asarray(back), np.asarray(image))


def test_a_rollout_with_dataset_files_archives_them_as_they_are(tiny: Callable[[str], Path], tmp_path: Path) -> None:
    files = [_file(tmp_path / f"p{i}.webp", encoded(make_image(56, 56, seed=i), "WEBP", quality=70))
             for i in range(3)]

    class Files:
        name = "files"
        turn = 0

        def ask(self) -> Message:
            return Message(role="user", content=(ImagePart(str(files[self.turn])), TextPart("and this?")))

        async def reset(self, seed: int) -> Observation:
            return Observation(messages=[self.ask()])

        async def step(self, message: Message) -> EnvStep:
            self.turn += 1
            if self.turn == len(files):
                return EnvStep(reward=1.0, done=True)
            return EnvStep(messages=[self.ask()])

    renderer = create_renderer(tiny("qwen2_vl"))
    with RunWriter(tmp_path / "run", renderer.feature_store) as writer:
        result = asyncio.run(run_rollout(Files(), renderer, Instant(renderer), RolloutConfig(max_turns=4, max_tokens=4),
                                         seed=0, trajectory_id="f", archive=writer))
        writer.write(result.trajectory, result.originals)
    t = result.trajectory
    assert t.error is None and len(t.image_ids) == 3 and result.originals == {}
    reader = RunReader(tmp_path / "run")
    assert [reader.original_path(i).read_bytes() for i in t.image_ids] == [f.read_bytes() for f in files]


def test_a_file_changed_since_it_was_rendered_is_refused(store: FeatureStore, tmp_path: Path) -> None:
    path = _file(tmp_path / "a.png", encoded(make_image(40, 40, seed=1), "PNG"))
    features = store.get_or_process(str(path))
    path.write_bytes(encoded(make_image(40, 40, seed=2), "PNG"))  # the dataset was rewritten meanwhile
    with RunWriter(tmp_path / "run", store) as writer, pytest.raises(StoreError, match="changed since it was rendered"):
        writer.archive_image(features.id, str(path), features)
    assert not list((tmp_path / "run").glob("blobs/*/*"))  # nothing half-archived


def test_a_missing_file_is_a_store_error_naming_the_image(store: FeatureStore, tmp_path: Path) -> None:
    path = _file(tmp_path / "a.png", encoded(make_image(40, 40, seed=1), "PNG"))
    features = store.get_or_process(path)
    path.unlink()
    with RunWriter(tmp_path / "run", store) as writer, pytest.raises(StoreError, match=features.id[:12]):
        writer.archive_image(features.id, path, features)


def test_older_runs_png_originals_stay_readable(store: FeatureStore, tmp_path: Path) -> None:
    image = make_image(48, 40, seed=5)
    with RunWriter(tmp_path, store) as writer:
        image_id, path = archive(writer, image)
        path.unlink()  # what an older writer left: the original as PNG
        old = path.with_suffix(".png")
        image.save(old, format="PNG")
        assert store.get_or_process(writer.restore_image(image_id)).id == image_id
        assert archive(writer, image)[1] == old  # found as archived: no second copy
    assert sorted(p.suffix for p in tmp_path.glob("blobs/*/*")) == [".features", ".png"]


def test_a_different_file_in_the_archive_is_a_reload_error(store: FeatureStore, tmp_path: Path) -> None:
    jpg = encoded(make_image(64, 48, seed=6), "JPEG")
    small = FeatureStore(store.config, max_bytes=0)  # keeps nothing unpinned: every use reloads
    with RunWriter(tmp_path, small) as writer:
        image_id, path = archive(writer, jpg)
        with small.pinned([image_id], reload=writer.restore_image):
            assert small.get(image_id).id == image_id
        path.write_bytes(encoded(make_image(64, 48, seed=7), "JPEG"))
        changed = pytest.raises(ImageReloadError, match=image_id[:12])
        with small.pinned([image_id], reload=writer.restore_image), changed:
            small.get(image_id)


@pytest.fixture
def http_image() -> Iterator[dict[str, Any]]:
    served = {"body": encoded(make_image(30, 20, seed=12), "PNG"), "gets": 0}

    class One(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            served["gets"] += 1
            self.send_response(200)
            self.send_header("Content-Length", str(len(served["body"])))
            self.end_headers()
            self.wfile.write(served["body"])

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), One)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    served["url"] = f"http://127.0.0.1:{server.server_address[1]}/cat.png"
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()


def test_a_remote_original_is_fetched_again_and_checked(store: FeatureStore, tmp_path: Path,
                                                        http_image: dict[str, Any]) -> None:
    url, png = http_image["url"], http_image["body"]
    features = store.get_or_process(url, limits=ImageLimits(allow_remote=True))
    with RunWriter(tmp_path / "run", store) as writer:
        path = Path(writer.archive_image(features.id, url, features))
        writer.flush()
        assert path.suffix == ".png" and path.read_bytes() == png and http_image["gets"] == 2
    http_image["body"] = encoded(make_image(30, 20, seed=13), "PNG")  # the server now serves another picture
    with RunWriter(tmp_path / "again", store) as writer, pytest.raises(StoreError, match="changed since"):
        writer.archive_image(features.id, url, features)


def test_encode_parts_are_the_encoding_with_arrays_as_views() -> None:
    big = np.arange(300_000, dtype=np.uint8).reshape(1000, 300)
    obj = {"a": big, "b": [1, "x", np.arange(5, dtype=np.int32)], "c": big[::2]}
    parts = encode_parts(obj)
    assert b"".join(parts) == encode(obj)
    assert any(isinstance(p, memoryview) and np.shares_memory(np.frombuffer(p, np.uint8), big) for p in parts)
    back = decode(b"".join(parts))
    assert np.array_equal(back["a"], big) and np.array_equal(back["c"], big[::2])
