"""`rollwire bench codec`: the transport codec's encode and decode MB/s against memcpy.

memcpy is `np.copy` of the same bytes (the least any encoder that returns new bytes can do);
pickle protocol 5 is shown beside it. Decoding returns a zero-copy view, so "decode" measures
parsing and checking the header, and "decode + own copy" copies the view out (like pickle).
"""

from __future__ import annotations

import pickle
from functools import partial

import msgspec
import numpy as np

from rollwire.bench.report import Report, Table, median_seconds
from rollwire.transport.codec import decode, enc_hook, encode

SHAPES = {"float32 (4096, 1176)": ((4096, 1176), np.float32), "uint8 (5476, 1176)": ((5476, 1176), np.uint8)}
QUICK_SHAPES = {"float32 (512, 1176)": ((512, 1176), np.float32)}


def _array(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    rng = np.random.default_rng(0)
    if dtype is np.uint8:
        return rng.integers(0, 256, shape, dtype=np.uint8)
    return rng.standard_normal(shape).astype(dtype)


def _decode_copy(data: bytes) -> np.ndarray:
    return np.array(decode(data))


def run(quick: bool = False) -> Report:
    repeat = 5 if quick else 9
    table = Table(["array", "MB", "op", "rollwire MB/s", "memcpy MB/s", "rollwire / memcpy", "pickle 5 MB/s"])
    figures: dict[str, dict[str, float]] = {}
    for label, (shape, dtype) in (QUICK_SHAPES if quick else SHAPES).items():
        arr = _array(shape, dtype)
        mb = arr.nbytes / 1e6
        ours, theirs = encode(arr), pickle.dumps(arr, protocol=5)
        if not np.array_equal(decode(ours), arr):
            raise AssertionError("codec round trip changed the array")
        t_copy = median_seconds(partial(np.copy, arr), repeat)
        t_enc = median_seconds(partial(encode, arr), repeat)
        t_prev = median_seconds(partial(msgspec.msgpack.encode, arr, enc_hook=enc_hook), repeat)
        t_pickle_enc = median_seconds(partial(pickle.dumps, arr, protocol=5), repeat)
        t_dec = median_seconds(partial(decode, ours), repeat)
        t_dec_copy = median_seconds(partial(_decode_copy, ours), repeat)
        t_pickle_dec = median_seconds(partial(pickle.loads, theirs), repeat)
        rows = (("encode", t_enc, t_pickle_enc), ("encode, previous (array inside an Ext: two copies)", t_prev,
                                                  t_pickle_enc),
                ("decode (zero-copy view)", t_dec, t_pickle_dec),
                ("decode + own copy", t_dec_copy, t_pickle_dec))
        for op, t, t_pickle in rows:
            table.add(label, f"{mb:.1f}", op, f"{mb / t:,.0f}", f"{mb / t_copy:,.0f}", f"{t_copy / t:.2f}×",
                      f"{mb / t_pickle:,.0f}")
        figures[label] = {
            "mb": mb, "bytes": len(ours), "pickle_bytes": len(theirs), "memcpy_mb_s": mb / t_copy,
            "encode_mb_s": mb / t_enc, "decode_mb_s": mb / t_dec, "decode_copy_mb_s": mb / t_dec_copy,
            "pickle_encode_mb_s": mb / t_pickle_enc, "pickle_decode_mb_s": mb / t_pickle_dec,
            "encode_vs_memcpy": t_copy / t_enc, "previous_encode_mb_s": mb / t_prev,
            "previous_encode_vs_memcpy": t_copy / t_prev, "decode_copy_vs_memcpy": t_copy / t_dec_copy,
        }
    worst_enc = min(f["encode_vs_memcpy"] for f in figures.values())
    worst_dec = min(f["decode_copy_vs_memcpy"] for f in figures.values())
    return Report(
        name="codec", command="rollwire bench codec" + (" --quick" if quick else ""),
        summary=(f"encode {worst_enc:.2f}× memcpy, decode + own copy {worst_dec:.2f}× memcpy at worst "
                 "(target ≥ 0.8× both ways)."),
        tables=[table],
        notes=["memcpy = `np.copy` of the same array, timed in the same run (thread CPU time, median). Decode "
               "returns a read-only view of "
               "the input (no copy), so its MB/s is the header check alone; \"+ own copy\" copies the view out, "
               "like pickle does. \"previous\" is the encoder this release replaced (the array's bytes joined "
               "into an Ext, then copied into msgspec's output), timed in the same run; both give the same bytes."],
        figures={"arrays": figures, "worst_encode_vs_memcpy": worst_enc, "worst_decode_copy_vs_memcpy": worst_dec},
    )
