"""`run.json`, the run's manifest: written by the first run, and a later run with other `settings`
(model fingerprint, sampling, environment, seed) is refused with `ManifestMismatchError`."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rollwire.errors import ManifestMismatchError, StoreError
from rollwire.store.files import atomic_write, read_file
from rollwire.store.rows import honest_json

MANIFEST = "run.json"


def load_manifest(path: Path) -> dict[str, Any]:
    """The manifest at `path` (it exists): a JSON object with a `settings` object, or a StoreError."""
    try:
        manifest = json.loads(read_file(path).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise StoreError(f"{path} is not a run manifest: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("settings"), dict):
        raise StoreError(f"{path} is not a run manifest (no settings)")
    return manifest


def _flat(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, Mapping) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def settle_manifest(root: Path, manifest: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Compare `manifest["settings"]` with the run's `run.json` (refusing a difference), or write it."""
    path = root / MANIFEST
    if os.path.lexists(path):
        old = load_manifest(path)
        if manifest is None:
            return old
        ours, theirs = _flat(old["settings"]), _flat(json.loads(honest_json(manifest))["settings"])
        differences = {k: (ours.get(k), theirs.get(k)) for k in sorted(ours.keys() | theirs.keys())
                       if ours.get(k) != theirs.get(k)}
        if differences:
            raise ManifestMismatchError(str(root), differences)
        return old
    if manifest is None:
        return None
    if not isinstance(manifest.get("settings"), Mapping):
        raise StoreError("a run manifest needs a 'settings' mapping")
    atomic_write(path, (json.dumps(json.loads(honest_json(manifest)), indent=2) + "\n").encode())
    return dict(manifest)
