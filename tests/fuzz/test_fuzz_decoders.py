"""Short fuzz runs of every decoder (the long runs are `scripts/fuzz.py`): random bytes and
mutations of real payloads give a valid value or a rollwire typed error, never anything else."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path

import fuzz_targets as ft
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FAST = sorted(name for name, t in ft.TARGETS.items() if not t.needs_model)


@pytest.fixture(scope="module")
def ctx(tiny: Callable[[str], Path]) -> Iterator[ft.Context]:
    context = ft.Context(model_dir=tiny("qwen2_vl"))
    yield context
    context.close()


def _run(name: str, ctx: ft.Context, rnd: random.Random, raw: bytes, use_raw: bool) -> None:
    target, seeds = ft.TARGETS[name], ctx.seeds(name)
    ft.check(target, raw if use_raw else ft.mutate(rnd.choice(seeds), rnd, seeds, target.kind), ctx)


_SETTINGS = {"deadline": None, "database": None, "suppress_health_check": [HealthCheck.function_scoped_fixture]}
_ONE_IN_TEN = st.integers(0, 9).map(lambda i: i == 0)  # raw random bytes; else a mutated real payload


@pytest.mark.parametrize("name", FAST)
@settings(max_examples=300, **_SETTINGS)
@given(rnd=st.randoms(use_true_random=False), raw=st.binary(max_size=512), use_raw=_ONE_IN_TEN)
def test_decoder_gives_a_value_or_a_typed_error(name: str, ctx: ft.Context, rnd: random.Random, raw: bytes,
                                                 use_raw: bool) -> None:
    _run(name, ctx, rnd, raw, use_raw)


@settings(max_examples=25, **_SETTINGS)
@given(rnd=st.randoms(use_true_random=False), raw=st.binary(max_size=256), use_raw=_ONE_IN_TEN)
def test_server_answers_every_body_without_an_untyped_error(ctx: ft.Context, rnd: random.Random, raw: bytes,
                                                            use_raw: bool) -> None:
    _run("server_request", ctx, rnd, raw, use_raw)


def test_the_harness_catches_an_untyped_error() -> None:
    """The property check itself: an untyped exception is a finding, a typed one is not."""
    def boom(data: bytes, ctx: ft.Context) -> None:
        raise TypeError("untyped")

    with pytest.raises(ft.Finding, match="untyped TypeError"):
        ft.check(ft.Target("boom", boom, lambda c: []), b"", ft.Context())
    ft.check(ft.TARGETS["codec_any"], b"\x91" * 5000 + b"\xc0", ft.Context())  # deep nesting: typed
