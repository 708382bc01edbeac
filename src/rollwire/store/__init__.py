"""Rollouts on disk: JSONL rows, hash-addressed image blobs, msgpack trajectory shards.

```
RUN_DIR/
  run.json                   the run's manifest: model fingerprint, sampling, environment, seed
  rollouts.jsonl             one honest-JSON row per finished rollout (the commit record)
  blobs/ab/<id>.jpg          each unique image once: the original as given, its encoded file as it
                               is (.jpg, .png, .webp, ...); a PIL image as uncompressed TIFF
                               (lossless, ~1 ms; a palette image as PNG); older runs hold .png
  blobs/ab/<id>.features     ...and its uint8 features, for training (codec msgpack + CRC)
  shards/shard-00000.bin     length + CRC framed records, one packed trajectory each
  rollouts-<w>.jsonl         ...the rows of writer `w` when several write at once (Ray workers),
  shards/shard-<w>-00000.bin    each with its own row and shard files; readers merge them
```

A rollout is committed by its JSONL row, written (and flushed) only after its blobs and its
shard record are on disk, so a crash leaves at most uncommitted leftovers: a torn shard tail,
a partial last line, orphan blobs. Reopening truncates the partial line; rerunning skips the
ids committed without error and runs failed ones again (the newer row supersedes the older;
readers return the newest). The reader checks every row, frame and blob and refuses anything
corrupt or hostile with a `StoreError`.

One module per job: `files` (regular files only, atomic writes), `blobs` (the blob formats),
`archive` (writing a run's blobs), `rows` (the row files), `manifest` (`run.json`), `shards`
(framed trajectory records), `writer` (`RunWriter`) and `reader` (`RunReader`).
"""

from rollwire.errors import ManifestMismatchError, StoreError
from rollwire.store.blobs import archive_image, decode_features, encode_features
from rollwire.store.manifest import MANIFEST
from rollwire.store.reader import RunReader
from rollwire.store.rows import ROWS, honest_json, row_files, trajectory_row
from rollwire.store.writer import RunWriter

__all__ = [
    "MANIFEST",
    "ROWS",
    "ManifestMismatchError",
    "RunReader",
    "RunWriter",
    "StoreError",
    "archive_image",
    "decode_features",
    "encode_features",
    "honest_json",
    "row_files",
    "trajectory_row",
]
