"""Small inline SVG bar charts (no script, no library): a histogram is a list of labelled counts."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from itertools import pairwise

WIDTH, HEIGHT, PAD = 340, 150, 22


def bar_chart(title: str, labels: Sequence[str], counts: Sequence[int]) -> str:
    """One card with an SVG bar per (label, count); each bar's title says its label and count."""
    head = f'<div class="card"><h3>{escape(title)}</h3>'
    if not counts:
        return head + '<div class="meta">no data</div></div>'
    top = max(max(counts), 1)
    slot = (WIDTH - 2 * PAD) / len(counts)
    bars = []
    for k, (label, count) in enumerate(zip(labels, counts, strict=True)):
        h = (HEIGHT - 2 * PAD) * count / top
        x = PAD + k * slot
        y = HEIGHT - PAD - h
        tip = escape(f"{label}: {count}")
        bars.append(f'<g><title>{tip}</title><rect x="{x + 1:.1f}" y="{y:.1f}" width="{max(slot - 2, 1):.1f}" '
                    f'height="{h:.1f}"></rect><text x="{x + slot / 2:.1f}" y="{y - 3:.1f}" '
                    f'text-anchor="middle">{count}</text></g>')
    step = max(1, len(labels) // 6)  # at most ~6 axis labels
    ticks = [f'<text x="{PAD + k * slot + slot / 2:.1f}" y="{HEIGHT - 6}" text-anchor="middle">{escape(label)}</text>'
             for k, label in enumerate(labels) if k % step == 0]
    svg = (f'<svg class="chart" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
           f'aria-label="{escape(title)}">{"".join(bars)}{"".join(ticks)}</svg>')
    return head + svg + "</div>"


def histogram_labels(edges: Sequence[float], *, ranges: bool = False) -> list[str]:
    """Bin labels of a histogram's edges: each bin's left edge, or with `ranges` its interval (the
    last bin is closed: numpy's); the one bin of equal values is that value."""
    if len(edges) == 2 and edges[0] == edges[1]:
        return [f"{edges[0]:g}"]
    if not ranges:
        return [f"{e:.3g}" for e in edges[:-1]]
    last = len(edges) - 2
    return [f"[{a:.3g}, {b:.3g}{']' if k == last else ')'}" for k, (a, b) in enumerate(pairwise(edges))]
