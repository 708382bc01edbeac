"""`rollwire bench`: runs, prints well-formed figures, and writes its docs sections (no timed asserts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from rollwire.bench.report import DOC_HEADER, Report, Table, write_sections


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    return subprocess.run([sys.executable, "-m", "rollwire.cli", "bench", *args], capture_output=True, text=True,
                          env=env, timeout=300, check=False)


def test_codec_quick_json_has_the_expected_figures() -> None:
    out = bench("codec", "--quick", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["benchmark"] == "codec"
    assert report["command"] == "rollwire bench codec --quick"
    assert report["machine"]["cores"] == os.cpu_count()
    (label, figures), = report["figures"]["arrays"].items()
    assert label == "float32 (512, 1176)"
    assert figures["bytes"] == 512 * 1176 * 4 + 32  # the array plus its ext frame and header
    for key in ("memcpy_mb_s", "encode_mb_s", "decode_mb_s", "decode_copy_mb_s", "pickle_encode_mb_s",
                "pickle_decode_mb_s", "encode_vs_memcpy", "decode_copy_vs_memcpy"):
        assert isinstance(figures[key], float) and figures[key] > 0, key
    assert report["figures"]["worst_encode_vs_memcpy"] == figures["encode_vs_memcpy"]
    assert report["tables"][0]["columns"][0] == "array" and len(report["tables"][0]["rows"]) == 4


def test_all_quick_writes_each_section(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nKept text.\n")
    out = bench("all", "--quick", "--skip", "render", "--skip", "memory", "--skip", "embedded", "--skip", "e2e",
                "--write", str(doc))
    assert out.returncode == 0, out.stderr
    assert "rollwire / memcpy" in out.stdout and "packed / floor" in out.stdout
    text = doc.read_text()
    assert "Kept text." in text
    names = ["features", "wire", "codec", "transport"]
    starts = [text.index(f"<!-- {n}:start -->\n## {n}\n\n`rollwire bench {n} --quick`") for n in names]
    assert starts == sorted(starts)  # in the registry's order
    for n in names:
        section = text.split(f"<!-- {n}:start -->")[1].split(f"<!-- {n}:end -->")[0]
        assert "cores shared with other jobs" in section and "\n| " in section  # machine line and a table
    assert "render:start" not in text and "e2e:start" not in text


def report(name: str, value: str) -> Report:
    table = Table(["what", "value"])
    table.add("x", value)
    return Report(name=name, command=f"rollwire bench {name}", summary=f"{name} summary", tables=[table],
                  notes=[f"{name} note"])


def test_write_sections_replaces_each_and_keeps_the_others(tmp_path: Path) -> None:
    doc = tmp_path / "docs" / "benchmarks.md"
    write_sections(doc, [report("render", "1"), report("wire", "2")])
    first = doc.read_text()
    assert first.startswith(DOC_HEADER)
    assert first.index("## render") < first.index("## wire")
    write_sections(doc, [report("render", "3")])
    second = doc.read_text()
    assert "| x | 3 |" in second and "| x | 1 |" not in second and "| x | 2 |" in second
    assert second.count("<!-- render:start -->") == 1
    assert second.index("## render") < second.index("## wire")  # replaced in place
    write_sections(doc, [report("features", "4")])  # new: placed in the benchmarks' order
    third = doc.read_text()
    assert third.index("## render") < third.index("## features") < third.index("## wire")
    for name in ("render", "wire"):
        section = second.split(f"<!-- {name}:start -->")[1].split(f"<!-- {name}:end -->")[0]
        assert f"`rollwire bench {name}`" in section and f"{name} summary" in section and f"{name} note" in section
