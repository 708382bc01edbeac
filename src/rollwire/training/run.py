"""A run directory's rollouts as training samples, in one call.

The run's `run.json` says which model rendered it (`about.model_dir`) and at which temperature it
sampled (`settings.sampling.temperature`); the features of each rollout's images come from the
run's blobs into the renderer's feature store before its samples are built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rollwire.errors import SampleError
from rollwire.features import FeatureStore
from rollwire.render import Renderer, create_renderer
from rollwire.store import RunReader
from rollwire.training.rope import RopeIndex
from rollwire.training.samples import PixelFormat, Sample, SampleBuilder, TensorKind

__all__ = ["samples_from_run"]


def samples_from_run(
    run_dir: str | Path | RunReader,
    *,
    model_dir: str | Path | None = None,
    renderer: Renderer | None = None,
    mrope: bool | RopeIndex = False,
    pixel_format: PixelFormat = "float32",
    tensors: TensorKind = "numpy",
    include_failed: bool = False,
    model_inputs: bool = False,
) -> list[Sample]:
    """Every rollout's samples, in the run's row order (failed rollouts left out unless asked).

    The model directory is `model_dir`, else the one `run.json` recorded; `mrope=True` adds M-RoPE
    `position_ids` from that model's `get_rope_index` (Qwen-VL families; needs torch); a `RopeIndex`
    is used as given.
    """
    reader = run_dir if isinstance(run_dir, RunReader) else RunReader(run_dir)
    manifest = reader.manifest() or {}
    recorded = (manifest.get("about") or {}).get("model_dir")
    where = Path(model_dir) if model_dir is not None else Path(recorded) if isinstance(recorded, str) else None
    if renderer is None:
        if where is None:
            raise SampleError(f"{reader.root}: run.json names no model directory; pass model_dir= or renderer=")
        renderer = create_renderer(where)
    rope_index = mrope if isinstance(mrope, RopeIndex) else None
    if mrope is True:
        if where is None:
            raise SampleError("mrope=True needs the model directory (model_dir=, or a run.json that names it)")
        rope_index = RopeIndex.from_model_dir(where)
    temperature = ((manifest.get("settings") or {}).get("sampling") or {}).get("temperature")
    builder = SampleBuilder.for_renderer(renderer, pixel_format=pixel_format, tensors=tensors,
                                         include_failed=include_failed, model_inputs=model_inputs,
                                         temperature=_number(temperature), rope_index=rope_index)
    store = renderer.feature_store
    samples: list[Sample] = []
    for trajectory in reader.trajectories():
        if isinstance(store, FeatureStore):
            reader.load_features(store, trajectory)
        samples.extend(builder.build(trajectory))
    return samples


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
