"""Code blocks of the pages in docs/, for the tests that run them as written."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.M | re.S)


def blocks(page: str, language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall((DOCS / page).read_text()) if lang == language]


def files(page: str) -> dict[str, str]:
    """The page's code blocks whose first line is `# <file name>`."""
    out = {}
    for _lang, body in BLOCK.findall((DOCS / page).read_text()):
        first = body.splitlines()[0]
        if re.fullmatch(r"# [\w.]+\.(py|toml)", first):
            out[first[2:]] = body
    return out


def rollwire_commands(page: str, **values: str) -> list[list[str]]:
    """The page's `rollwire ...` lines (of its bash blocks) as argument lists, with each
    placeholder word (e.g. MODEL_DIR) replaced by its value."""
    out = []
    for body in blocks(page, "bash"):
        for line in body.splitlines():
            if line.startswith("rollwire "):
                out.append([values.get(word, word) for word in shlex.split(line)[1:]])
    return out


def python_with(page: str, **assignments: str) -> list[str]:
    """The page's Python blocks, with each `NAME = "..."` line of `assignments` set to its value."""
    out = []
    for body in blocks(page, "python"):
        for name, value in assignments.items():
            body = re.sub(rf'^{name} = ".*"$', f"{name} = {value!r}", body, flags=re.M)
        out.append(body)
    return out
