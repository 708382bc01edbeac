"""One rollout as HTML, turn by turn: the messages that led to each step, the sampled tokens (each
a box; its ids and logprobs in the title), the parsed tool calls and the step's reward.

Everything from the run directory is data, escaped here (`html.escape`, quotes included): a
message holding `</script>` or markup shows as text. Rows are read defensively: a field of an
unexpected type is shown as JSON, never trusted as structure.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from html import escape
from typing import Any

from rollwire.rollout.types import Step, Trajectory
from rollwire.view.thumbs import Thumbnails
from rollwire.view.tokens import token_pieces

Decode = Callable[[list[int]], str]


def _json(value: Any) -> str:
    return escape(json.dumps(value, ensure_ascii=False, indent=1, default=str))


def _bucket(logprob: float | None) -> str:
    """A colour class by the token's probability: p0 (< 0.1) ... p4 (>= 0.9); pn without a logprob."""
    if logprob is None or not math.isfinite(logprob):
        return "pn"
    p = math.exp(logprob)
    return "p0" if p < 0.1 else "p1" if p < 0.3 else "p2" if p < 0.6 else "p3" if p < 0.9 else "p4"


def _tip(ids: Sequence[int], logprobs: Sequence[float | None]) -> str:
    parts = []
    for i, lp in zip(ids, logprobs, strict=True):
        parts.append(f"token {i}" if lp is None else f"token {i} · logprob {lp:.4f} · p {math.exp(lp):.3f}")
    return "\n".join(parts)


def sampled_html(step: Step, decode: Decode | None, specials: Collection[int] = ()) -> str:
    """The step's completion, one box per token (or per few tokens that form one character)."""
    pieces = token_pieces(step.completion_ids, step.completion_logprobs,
                          decode or (lambda ids: "".join(f"[{i}]" for i in ids)))  # no tokenizer: the ids
    spans = []
    for p in pieces:
        known = [lp for lp in p.logprobs if lp is not None]
        special = " special" if any(i in specials for i in p.ids) else ""
        cls = f"tok {_bucket(min(known) if known else None)}{special}"
        spans.append(f'<span class="{cls}" title="{escape(_tip(p.ids, p.logprobs))}">{escape(p.text)}</span>')
    return f'<div class="sampled">{"".join(spans)}</div>'


def _content_html(content: Any, thumbs: Thumbnails) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return f'<div class="text">{escape(content)}</div>'
    if not isinstance(content, list):
        return f"<pre>{_json(content)}</pre>"
    out = []
    for part in content:
        if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
            out.append(f'<div class="text">{escape(part["text"])}</div>')
        elif isinstance(part, Mapping) and part.get("type") == "image" and isinstance(part.get("image_id"), str):
            out.append(image_html(part["image_id"], thumbs))
        else:
            out.append(f"<pre>{_json(part)}</pre>")
    return "".join(out)


def image_html(image_id: str, thumbs: Thumbnails) -> str:
    """An img filled by the page's script from the one copy of its thumbnail (so a GRPO group's shared
    image is embedded once); a placeholder naming why when the run has no original to show."""
    if thumbs.url(image_id) is None:
        why = thumbs.missing.get(image_id, "not archived")
        return f'<span class="noimg" title="{escape(why)}">image {escape(image_id[:16])}: not shown</span>'
    (w, h), (ow, oh) = thumbs.sizes[image_id]
    return (f'<img class="thumb" data-image="{escape(image_id)}" width="{w}" height="{h}" '
            f'alt="image {escape(image_id[:16])}" title="image {escape(image_id)} · {ow}×{oh}">')


def _calls_html(calls: Any) -> str:
    if not calls:
        return ""
    if not isinstance(calls, list):
        return f"<pre>{_json(calls)}</pre>"
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, Mapping) else None
        if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
            out.append(f'<div class="call">→ {escape(fn["name"])}({escape(str(fn.get("arguments", "")))})</div>')
        else:
            out.append(f'<div class="call">{_json(call)}</div>')
    return "".join(out)


def message_html(message: Any, thumbs: Thumbnails, sampled: str | None = None) -> str:
    """A chat message; an assistant message shows `sampled` (its tokens) in place of its text."""
    if not isinstance(message, Mapping):
        return f'<div class="msg"><pre>{_json(message)}</pre></div>'
    role = str(message.get("role", "?"))
    cls = role if role in ("system", "user", "assistant", "tool") else ""
    label = role + (f" · {message['name']}" if isinstance(message.get("name"), str) else "")
    if isinstance(message.get("tool_call_id"), str):
        label += f" · call {message['tool_call_id']}"
    body = ""
    if isinstance(message.get("reasoning_content"), str):
        body += f'<div class="meta">reasoning</div><div class="text">{escape(message["reasoning_content"])}</div>'
    body += sampled if sampled is not None else _content_html(message.get("content"), thumbs)
    body += _calls_html(message.get("tool_calls"))
    return f'<div class="msg {cls}"><div class="role">{escape(label)}</div>{body}</div>'


def _turn_head(k: int, step: Step, reward: float | None) -> str:
    bits = [f"turn {k + 1}", f"{len(step.prompt_ids)} prompt + {len(step.completion_ids)} sampled tokens",
            f"finish {step.finish_reason}"]
    bits.append("bridged" if step.bridged else f"full render ({step.render_reason or 'first turn'})")
    if step.branch:
        bits.append(f"branch {step.branch}")
    if step.parse_error:
        bits.append(f"parse error: {step.parse_error}")
    head = escape(" · ".join(bits))
    if reward is not None:
        head += f' · <span class="reward">reward {reward:g}</span>'
    return f'<div class="turn-head">{head}</div>'


def _split(messages: list[Any], n_steps: int) -> list[list[Any]] | None:
    """The messages before each assistant message, then those after the last; None when the final
    conversation does not hold one assistant message per step (the environment rewrote history)."""
    chunks: list[list[Any]] = [[]]
    for m in messages:
        if isinstance(m, Mapping) and m.get("role") == "assistant":
            chunks.append([m])
        else:
            chunks[-1].append(m)
    return chunks if len(chunks) - 1 == n_steps else None


def turns_html(trajectory: Trajectory, thumbs: Thumbnails, decode: Decode | None,
               specials: Collection[int] = ()) -> str:
    """The rollout's turns: inputs, sampled tokens, reward; after them what the environment said last."""
    steps, rewards = trajectory.steps, trajectory.rewards
    messages = trajectory.messages if isinstance(trajectory.messages, list) else []
    chunks = _split(messages, len(steps))
    out = []
    if chunks is None and messages:
        out.append('<h3>final conversation</h3>' + "".join(message_html(m, thumbs) for m in messages))
    out.append('<ol class="turns">')
    for k, step in enumerate(steps):
        reward = rewards[k] if k < len(rewards) else None
        out.append(f'<li class="turn">{_turn_head(k, step, reward)}')
        sampled = sampled_html(step, decode, specials)
        if chunks is None:
            out.append(f'<div class="msg assistant"><div class="role">sampled</div>{sampled}</div>')
        else:
            inputs = chunks[k][1:] if k else chunks[0]
            out.extend(message_html(m, thumbs) for m in inputs)
            out.append(message_html(chunks[k + 1][0], thumbs, sampled=sampled))
        out.append("</li>")
    out.append("</ol>")
    if chunks is not None and len(chunks[-1]) > 1:
        out.append('<h3>after the last turn</h3>' + "".join(message_html(m, thumbs) for m in chunks[-1][1:]))
    elif chunks is not None and not steps:
        out.append("".join(message_html(m, thumbs) for m in chunks[0]))
    return "".join(out)
