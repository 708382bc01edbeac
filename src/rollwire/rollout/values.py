"""Values an environment hands back (info, rewards, tools, message text), made honest JSON.

Everything an environment returns ends up in a JSONL row and a msgpack shard, so it must be a
value both hold exactly: None, bool, str (valid UTF-8), int in int64, finite float, lists, and
dicts with string keys, nested at most `MAX_DEPTH` deep. Numpy scalars become the Python number
they equal (a user writing `np.mean(...)` into `info` means the number); tuples become lists.
Anything else is replaced and reported by the field it sits in: a bad string gets U+FFFD for
each lone surrogate, a bad key is dropped, any other bad value becomes None. The caller records
the reports as the rollout's `env_error`; the cleaned value is what gets written.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

MAX_DEPTH = 32
_INT64 = (-(2**63), 2**63 - 1)
_SURROGATE = re.compile("[\ud800-\udfff]")


def honest_value(value: Any, field: str) -> tuple[Any, list[str]]:
    """(the cleaned value, one "field: reason" per value that had to be replaced)."""
    problems: list[str] = []
    return _clean(value, field, problems, 0), problems


def _clean(value: Any, field: str, problems: list[str], depth: int) -> Any:
    if value is None or type(value) is bool:
        return value
    if isinstance(value, np.generic) and isinstance(value, (np.bool_, np.integer, np.floating)):
        value = value.item()  # numpy scalar -> the Python number it equals
        if isinstance(value, bool):
            return value
    if isinstance(value, str):
        return _text(value, field, problems)
    if isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            problems.append(f"{field}: integer {_short(value)} does not fit in 64 bits")
            return None
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            problems.append(f"{field}: {value} is not a finite number")
            return None
        return float(value)
    if depth >= MAX_DEPTH and isinstance(value, (Mapping, list, tuple)):
        problems.append(f"{field}: nested deeper than {MAX_DEPTH} levels")
        return None
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                problems.append(f"{field}: key {_short(key)} ({type(key).__name__}) is not a string")
                continue
            name = _text(key, f"{field} key {_short(key)}", problems)
            out[name] = _clean(item, f"{field}[{name!r}]", problems, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [_clean(item, f"{field}[{k}]", problems, depth + 1) for k, item in enumerate(value)]
    hint = {"bytes": " (decode or base64 it)", "set": " (use a list)", "frozenset": " (use a list)",
            "ndarray": " (use .tolist())"}.get(type(value).__name__, "")
    problems.append(f"{field}: {type(value).__name__} is not JSON{hint}")
    return None


def _text(value: str, field: str, problems: list[str]) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        problems.append(f"{field}: text holds a lone surrogate (not UTF-8)")
        return _SURROGATE.sub("\ufffd", value)
    return str.__str__(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
