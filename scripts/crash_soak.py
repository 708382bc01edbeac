#!/usr/bin/env python
"""Crash soak: SIGKILL a real `rollwire rollout` at random moments, check the run directory
after every kill, resume it, and compare the finished run with a clean uninterrupted one.

    python scripts/crash_soak.py [--kills N] [--seed S] [--out DIR] [--prompts P] [--group G]
                                 [--max-turns T] [--max-tokens K] [--concurrency C]

A clean run (same settings, same run seed) goes first: it is the reference and it times the
command (seconds to the first row, seconds per rollout). Then one run directory is launched,
killed, checked and relaunched until N kills were delivered; each kill moment is uniform over that
attempt's expected duration (time to its first row, as measured so far, + the rollouts still to
do), drawn from `--seed`, so some land during model load or before the first write, some while
rows are written, some after the last row (a resume with nothing left to do is killed too). A
quarter of the kills (also chosen by the seed) instead strike the moment the attempt's first
shard record starts, between its blobs and its committing row.
After every attempt the directory must hold only whole committed rows (each trajectory, features
blob and original image reads back), keep every row committed before byte for byte, and nothing
outside it (the sandbox's HOME, TMPDIR and working folder, the model directory) may change. The last attempt runs to the
end and must exit 0 with exactly P*G successful rollouts whose deterministic fields (ids, seeds,
messages, prompt and completion token ids, images, blobs) equal the clean run's; logprobs may
differ by float noise from batching and are compared to a tolerance. Exit 1 on any violation.
The CI test (tests/test_crash_soak.py) runs `soak()` with 3 kills.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import msgspec  # noqa: E402

from rollwire.errors import RollwireError  # noqa: E402
from rollwire.store import ROWS, RunReader  # noqa: E402

FIRST_WRITE_SHARE = 0.25  # kills aimed at the first write of an attempt (the rest: uniform in time)
LOGPROB_TOLERANCE = 1e-4  # batching changes float sums by ~1e-6; a different token is far off
_FRAME_BYTES = 16  # store.shards._FRAME: magic, payload length, crc32
_RUN_FILE = re.compile(r"(run\.json|summary\.json|rollouts\.jsonl|\.lock|shards/shard-[0-9]{5,9}\.bin"
                       r"|blobs/[0-9a-f]{2}/[0-9a-f]{2,128}\.(features|png|tiff))")
_TMP_FILE = re.compile(r"(.*/)?\.[^/]+\.[0-9]+\.[0-9]+\.tmp")  # store.files.atomic_write's temporaries
_SUMMARY = re.compile(r"(\d+) / (\d+) / (\d+) / (\d+)")


@dataclass(frozen=True)
class Settings:
    """The `rollwire rollout` command every attempt (and the clean run) uses."""

    prompts: int = 32
    group: int = 2
    max_turns: int = 2
    max_tokens: int = 4
    concurrency: int = 4
    run_seed: int = 0

    @property
    def total(self) -> int:
        return self.prompts * self.group

    def argv(self, out: Path) -> list[str]:
        return [sys.executable, "-m", "rollwire.cli", "rollout", "--env", "shapes", "--out", str(out),
                "-n", str(self.prompts), "--group", str(self.group), "--max-turns", str(self.max_turns),
                "--max-tokens", str(self.max_tokens), "--concurrency", str(self.concurrency),
                "--seed", str(self.run_seed), "--no-progress"]


@dataclass
class Attempt:
    """One launch of the command on the soaked run directory."""

    number: int
    kill_at: float | None  # planned seconds after launch; None: run to the end
    seconds: float = 0.0  # seconds from launch to the kill (or the exit)
    killed: bool = False
    returncode: int | None = None
    rows_before: int = 0  # committed rows when it was launched
    rows_after: int = 0  # ...and once it was dead
    total: int = 0  # rollouts the run has in all
    lost: int = 0  # rows committed before the launch that are gone or changed
    leftovers: str = ""  # uncommitted debris the kill left (allowed): torn row, shard tail, orphans
    summary: str = ""  # "done / failed / unwritten / resumed" when it finished
    problems: list[str] = field(default_factory=list)

    opened: bool = False  # the run directory had its rows file when the process was dead
    first_row: float | None = None  # seconds from launch to its first committed row
    last_row: float | None = None  # ...and to its last
    at_first_write: bool = False  # killed as soon as its first shard record started (else at kill_at)

    @property
    def phase(self) -> str:
        if not self.killed:
            return "-"
        if self.rows_before == self.total:
            return "resume of a finished run"
        if self.at_first_write:
            return f"first write (+{self.rows_after - self.rows_before})"
        if self.rows_after > self.rows_before:
            return f"writing (+{self.rows_after - self.rows_before})"
        return "startup (no row yet)" if self.opened else "before the run dir was opened"

    @property
    def outcome(self) -> str:
        if self.killed:
            return "killed"
        return f"exit {self.returncode}" + (f", {self.summary}" if self.summary else "")


@dataclass
class SoakReport:
    settings: Settings
    seed: int
    clean_seconds: float
    attempts: list[Attempt]
    comparison: dict[str, Any]
    problems: list[str]

    @property
    def kills(self) -> int:
        return sum(a.killed for a in self.attempts)

    @property
    def lost(self) -> int:
        return sum(a.lost for a in self.attempts)

    @property
    def ok(self) -> bool:
        return not self.problems and not any(a.problems for a in self.attempts)

    def table(self) -> str:
        head = ("#", "kill at s", "rows then", "phase", "leftovers", "rows lost", "check", "outcome")
        lines = [head]
        for a in self.attempts:
            lines.append((str(a.number), f"{a.seconds:.2f}" if a.killed else f"({a.seconds:.1f})",
                          f"{a.rows_after}/{self.settings.total}", a.phase, a.leftovers or "-", str(a.lost),
                          "ok" if not a.problems else "FAIL", a.outcome))
        widths = [max(len(row[k]) for row in lines) for k in range(len(head))]
        out = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in lines]
        out.insert(1, "  ".join("-" * w for w in widths))
        for a in self.attempts:
            out.extend(f"  attempt {a.number}: {p}" for p in a.problems)
        out.extend(f"  final: {p}" for p in self.problems)
        return "\n".join(out)

    def summary_line(self) -> str:
        c = self.comparison
        verdict = "OK" if self.ok else "FAILED"
        return (f"{verdict}: {self.kills} kills survived of {self.kills} delivered over {len(self.attempts)} attempts; "
                f"{self.lost} committed rows lost; final {c.get('rows', 0)}/{self.settings.total} rows, "
                f"{c.get('equal', 0)} equal to the clean run ({c.get('tokens', 0)} token ids, "
                f"{c.get('blobs', 0)} blobs byte-identical, max logprob diff {c.get('max_logprob_diff', 0.0):.2g}); "
                f"seed {self.seed}")


def _snapshot(roots: list[Path], skip: list[Path]) -> dict[str, tuple[int, int, int]]:
    """(mode, size, mtime_ns) of everything under `roots` except `skip`: what a kill may not change."""
    seen: dict[str, tuple[int, int, int]] = {}
    skip_set = {str(p) for p in skip}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in skip_set]
            for name in [*filenames, *dirnames, ""]:
                path = os.path.join(dirpath, name) if name else dirpath
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue
                # a folder's own mtime moves when the run directory is created in it; its entries are listed anyway
                seen[path] = (st.st_mode, 0, 0) if stat.S_ISDIR(st.st_mode) else (st.st_mode, st.st_size,
                                                                                   st.st_mtime_ns)
    return seen


def _diff(before: dict[str, tuple[int, int, int]], after: dict[str, tuple[int, int, int]]) -> list[str]:
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    return [f"{'created' if p not in before else 'removed' if p not in after else 'changed'} outside the run "
            f"directory: {p}" for p in changed[:10]]


def _committed(run: Path) -> tuple[bytes, int]:
    """(the committed rows: bytes up to the last newline, bytes of a torn tail after them)."""
    try:
        data = (run / ROWS).read_bytes()
    except FileNotFoundError:
        return b"", 0
    keep = data.rfind(b"\n") + 1
    return data[:keep], len(data) - keep


def check_run(run: Path, previous: bytes) -> tuple[bytes, int, str, list[str]]:
    """Check a run directory nobody is writing: (committed bytes, rows lost since `previous`,
    leftovers, problems). Every newest committed row must read back whole."""
    problems: list[str] = []
    committed, torn = _committed(run)
    lost = 0
    if not committed.startswith(previous):
        now = set(committed.splitlines())
        lost = sum(line not in now for line in previous.splitlines()) or 1  # changed order counts too
        problems.append(f"{lost} committed row(s) lost or rewritten")
    if not committed and not (run / ROWS).exists():
        return committed, lost, "no rows file yet", problems
    try:
        parsed = [json.loads(line) for line in committed.splitlines()]
    except ValueError as exc:
        return committed, lost, "", [*problems, f"a committed row is not JSON: {exc}"]
    newest = {row["id"]: row for row in parsed}
    successes = Counter(row["id"] for row in parsed if row.get("error") is None)
    problems += [f"rollout {i} committed {n} times" for i, n in successes.items() if n > 1]
    failed = [i for i, row in newest.items() if row.get("error") is not None]
    problems += [f"rollout {i} failed: {newest[i]['error']}" for i in failed[:3]]
    reader = RunReader(run)
    try:
        if not torn:  # a torn tail is refused by the reader until a writer cuts it (by design)
            listed = [row["id"] for row in reader.rows()]
            if listed != list(newest):
                problems.append("RunReader.rows() disagrees with the committed lines")
    except RollwireError as exc:
        problems.append(f"rows: {type(exc).__name__}: {exc}")
    used: dict[str, int] = {}  # shard -> bytes the committed rows account for
    images: set[str] = set()
    for rid, row in newest.items():
        try:
            t = reader.trajectory(row)
            if t.id != rid or len(t.steps) != row["turns"] or t.image_ids != row["image_ids"]:
                problems.append(f"rollout {rid}: the shard record does not match its row")
            for image_id in t.image_ids:
                if image_id not in images:
                    if reader.features(image_id).id != image_id:
                        problems.append(f"image {image_id}: features blob of another image")
                    reader.image(image_id).load()
                    images.add(image_id)
        except (RollwireError, OSError, ValueError) as exc:
            problems.append(f"rollout {rid} does not read back: {type(exc).__name__}: {exc}"[:300])
    for row in parsed:
        end = row["offset"] + _FRAME_BYTES + row["length"]
        used[row["shard"]] = max(used.get(row["shard"], 0), end)
    tail = sum(p.stat().st_size - used.get(p.name, 0) for p in (run / "shards").glob("*.bin"))
    blobs = [p for p in (run / "blobs").rglob("*") if p.is_file()] if (run / "blobs").exists() else []
    orphans = sum(p.stem not in images and not p.name.startswith(".") for p in blobs)
    strays, temps = [], 0
    for p in run.rglob("*"):
        rel = p.relative_to(run).as_posix()
        if p.is_symlink():
            strays.append(rel)
        elif p.is_file() and not _RUN_FILE.fullmatch(rel):
            if _TMP_FILE.fullmatch(rel):
                temps += 1
            else:
                strays.append(rel)
    problems += [f"unexpected file in the run directory: {s}" for s in strays[:5]]
    debris = [f"torn row {torn} B" if torn else "", f"shard tail {tail} B" if tail else "",
              f"{orphans} orphan blobs" if orphans else "", f"{temps} temp files" if temps else ""]
    return committed, lost, ", ".join(d for d in debris if d), problems


def compare_with_clean(run: Path, clean: Path, total: int) -> tuple[dict[str, Any], list[str]]:
    """The finished run against the clean one, rollout by rollout, on every deterministic field."""
    problems: list[str] = []
    got, want = RunReader(run), RunReader(clean)
    rows = {r["id"]: r for r in got.rows()}
    ref = {r["id"]: r for r in want.rows()}
    stats: dict[str, Any] = {"rows": len(rows), "equal": 0, "tokens": 0, "blobs": 0, "max_logprob_diff": 0.0}
    if len(rows) != total or set(rows) != set(ref):
        problems.append(f"{len(rows)} rollouts, clean run has {len(ref)} (want {total}); "
                        f"missing {sorted(set(ref) - set(rows))[:5]}, extra {sorted(set(rows) - set(ref))[:5]}")
    all_rows = list(got.rows(all_rows=True))
    if len(all_rows) != len(rows):
        problems.append(f"{len(all_rows) - len(rows)} superseded rows: some rollout ran twice")
    row_fields = ("env", "prompt_index", "sample_index", "seed", "reward", "rewards", "finish", "error", "turns",
                  "prompt_tokens", "completion_tokens", "image_ids", "messages", "tools", "env_info")
    step_fields = ("prompt_ids", "images", "completion_ids", "finish_reason", "stop_reason", "status",
                   "parse_error", "message", "bridged", "render_reason", "branch")
    for rid in sorted(set(rows) & set(ref)):
        a, b = rows[rid], ref[rid]
        diffs = [k for k in row_fields if a.get(k) != b.get(k)]
        if a.get("error") is not None or a.get("finish") not in ("done", "max_turns", "token_budget"):
            problems.append(f"rollout {rid} did not succeed: finish {a.get('finish')}, error {a.get('error')}")
        ta, tb = got.trajectory(a), want.trajectory(b)
        if len(ta.steps) != len(tb.steps):
            diffs.append("steps")
        for k, (sa, sb) in enumerate(zip(ta.steps, tb.steps, strict=False)):
            diffs += [f"step {k} {f}" for f in step_fields
                      if msgspec.to_builtins(getattr(sa, f)) != msgspec.to_builtins(getattr(sb, f))]
            stats["tokens"] += len(sa.prompt_ids) + len(sa.completion_ids)
            la, lb = sa.completion_logprobs or [], sb.completion_logprobs or []
            if len(la) != len(lb):
                diffs.append(f"step {k} logprobs")
            for x, y in zip(la, lb, strict=False):
                stats["max_logprob_diff"] = max(stats["max_logprob_diff"], abs(x - y))
                if abs(x - y) > LOGPROB_TOLERANCE:
                    diffs.append(f"step {k} logprob {x} vs {y}")
                    break
        for image_id in ta.image_ids:
            for ext in ("features", "png", "tiff"):
                mine = run / "blobs" / image_id[:2] / f"{image_id}.{ext}"
                theirs = clean / "blobs" / image_id[:2] / f"{image_id}.{ext}"
                if mine.exists() != theirs.exists() or (mine.exists() and mine.read_bytes() != theirs.read_bytes()):
                    diffs.append(f"blob {image_id}.{ext}")
                elif mine.exists():
                    stats["blobs"] += 1
        if diffs:
            problems.append(f"rollout {rid} differs from the clean run: {', '.join(diffs[:6])}")
        else:
            stats["equal"] += 1
    return stats, problems


def _launch(settings: Settings, out: Path, env: dict[str, str], cwd: Path, log_to: Path) -> subprocess.Popen[bytes]:
    with log_to.open("ab") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(settings.argv(out), env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)


def _rows_size(run: Path) -> int:
    try:
        return os.stat(run / ROWS).st_size
    except FileNotFoundError:
        return 0


def _last_summary(log: Path) -> str:
    found = _SUMMARY.findall(log.read_text(errors="replace"))
    return "{} / {} / {} / {}".format(*found[-1]) if found else ""


def soak(kills: int, seed: int, out: Path, settings: Settings, *, cache: Path | None = None,
         log: Callable[[str], None] = print) -> SoakReport:
    """Run the clean reference, then `kills` SIGKILLs and a final resume on `out/run` (see the module doc)."""
    out = out.resolve()
    if (out / "run").exists() or (out / "clean").exists():
        raise SystemExit(f"{out} holds an earlier soak: give an empty --out")
    for name in ("home", "tmp", "work", "logs"):
        (out / name).mkdir(parents=True, exist_ok=True)
    (out / "work" / "neighbour.txt").write_text("a file beside the run: a kill or resume must leave it alone\n")
    cache = cache or Path(os.environ.get("ROLLWIRE_CACHE") or ROOT / ".cache" / "rollwire")
    env = {**os.environ, "ROLLWIRE_CACHE": str(cache), "HOME": str(out / "home"), "TMPDIR": str(out / "tmp"),
           "XDG_CACHE_HOME": str(out / "home" / ".cache"),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    rng = random.Random(seed)
    run = out / "run"

    log(f"clean run: {' '.join(settings.argv(out / 'clean')[3:])}")
    start = time.monotonic()
    proc = _launch(settings, out / "clean", env, out / "work", out / "logs" / "clean.log")
    first_row = None
    while proc.poll() is None:
        if first_row is None and _committed(out / "clean")[0]:
            first_row = time.monotonic() - start
        time.sleep(0.05)
    clean_seconds = time.monotonic() - start
    if proc.returncode != 0 or first_row is None:
        raise SystemExit(f"the clean run failed (exit {proc.returncode}): see {out / 'logs' / 'clean.log'}")
    per_rollout = (clean_seconds - first_row) / max(1, settings.total - 1)
    first_rows, per_rollouts = [first_row], [per_rollout]  # the load changes: each attempt that writes adds its own
    log(f"clean run: {clean_seconds:.1f} s ({first_row:.1f} s to the first row, {per_rollout:.2f} s per rollout)")

    from rollwire.tiny_model import ensure_tiny_model

    # the model the CLI runs (its default); not the whole cache, which other processes may add models to
    outside = [out, ensure_tiny_model("qwen2_vl", cache_dir=cache)]
    skip = [run, out / "clean", out / "logs"]
    before = _snapshot(outside, skip)
    attempts: list[Attempt] = []
    previous = b""
    while sum(a.killed for a in attempts) < kills and len(attempts) < 3 * kills + 3:
        remaining = settings.total - len(previous.splitlines())
        expected = statistics.median(first_rows) + statistics.median(per_rollouts) * max(0, remaining - 1)
        kill_at, at_first_write = rng.uniform(0.0, expected), rng.random() < FIRST_WRITE_SHARE
        attempts.append(_attempt(len(attempts) + 1, expected * 1.5 if at_first_write else kill_at, settings, run,
                                 env, out, previous, at_first_write=at_first_write))
        a = attempts[-1]
        if a.first_row is not None and a.last_row is not None:
            first_rows.append(a.first_row)
            if a.rows_after - a.rows_before >= 3:
                per_rollouts.append((a.last_row - a.first_row) / (a.rows_after - a.rows_before - 1))
        previous = _committed(run)[0]
        after = _snapshot(outside, skip)
        attempts[-1].problems += _diff(before, after)
        before = after
        log(f"attempt {len(attempts)}: {attempts[-1].outcome} after {attempts[-1].seconds:.2f} s, "
            f"{attempts[-1].rows_after} rows, {len(attempts[-1].problems)} problems")
    problems = [] if sum(a.killed for a in attempts) >= kills else [f"only {sum(a.killed for a in attempts)} "
                                                                   f"of {kills} kills could be delivered"]
    final = _attempt(len(attempts) + 1, None, settings, run, env, out, previous)
    final.problems += _diff(before, _snapshot(outside, skip))
    attempts.append(final)
    if final.returncode != 0:
        problems.append(f"the final resume exited {final.returncode} (see {out / 'logs'})")
    done = _SUMMARY.fullmatch(final.summary)
    if done and int(done[1]) + int(done[4]) != settings.total:
        problems.append(f"final summary {final.summary} does not add up to {settings.total}")
    try:
        comparison, differences = compare_with_clean(run, out / "clean", settings.total)
    except (RollwireError, OSError, ValueError) as exc:
        comparison, differences = {}, [f"the finished run does not read back: {type(exc).__name__}: {exc}"]
    return SoakReport(settings, seed, clean_seconds, attempts, comparison, problems + differences)


def _shards(run: Path) -> list[tuple[str, int]]:
    try:
        return sorted((e.name, e.stat().st_size) for e in os.scandir(run / "shards"))
    except FileNotFoundError:
        return []


def _attempt(number: int, kill_at: float | None, settings: Settings, run: Path, env: dict[str, str], out: Path,
             previous: bytes, *, at_first_write: bool = False) -> Attempt:
    """Launch once; SIGKILL at `kill_at` seconds (or, `at_first_write`, as soon as a shard record
    starts: between its blobs and its row) unless it exits first; then check the directory."""
    attempt = Attempt(number, kill_at, rows_before=len(previous.splitlines()), total=settings.total,
                      at_first_write=at_first_write)
    log = out / "logs" / f"attempt-{number:03d}.log"
    start = time.monotonic()
    proc = _launch(settings, run, env, out / "work", log)
    deadline = None if kill_at is None else start + kill_at
    size, shards = _rows_size(run), _shards(run)
    while proc.poll() is None:
        if (now := _rows_size(run)) > size:
            attempt.last_row = time.monotonic() - start
            attempt.first_row = attempt.last_row if attempt.first_row is None else attempt.first_row
            size = now
        if deadline is not None and (time.monotonic() >= deadline or (at_first_write and _shards(run) != shards)):
            proc.send_signal(signal.SIGKILL)
            attempt.killed = True
            break
        time.sleep(0.001 if at_first_write else 0.005)
    attempt.returncode = proc.wait()
    attempt.seconds = time.monotonic() - start
    if attempt.killed and attempt.returncode != -signal.SIGKILL:  # it exited just before the signal
        attempt.killed = False
    if not attempt.killed:
        attempt.summary = _last_summary(log)
        if attempt.returncode != 0:
            attempt.problems.append(f"exited {attempt.returncode} on its own (see {log})")
    attempt.opened = (run / ROWS).exists()
    committed, attempt.lost, attempt.leftovers, problems = check_run(run, previous)
    attempt.rows_after = len(committed.splitlines())
    attempt.problems += problems
    return attempt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0, help="chooses the kill moments")
    parser.add_argument("--out", type=Path, help="an empty folder for the runs and logs (default: a temp dir)")
    parser.add_argument("--prompts", type=int, default=Settings.prompts)
    parser.add_argument("--group", type=int, default=Settings.group)
    parser.add_argument("--max-turns", type=int, default=Settings.max_turns)
    parser.add_argument("--max-tokens", type=int, default=Settings.max_tokens)
    parser.add_argument("--concurrency", type=int, default=Settings.concurrency)
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="rollwire-crash-soak-"))
    settings = Settings(prompts=args.prompts, group=args.group, max_turns=args.max_turns,
                        max_tokens=args.max_tokens, concurrency=args.concurrency)
    report = soak(args.kills, args.seed, out, settings)
    print(report.table())
    print(report.summary_line())
    print(f"run directories and logs: {out}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
