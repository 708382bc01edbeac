"""The render benchmark's rollwire / floor ratio in two fresh processes: a bare one, and one that has
loaded the HF tokenizer first (as `rollwire bench render` does for its HF baseline), with the minor
page faults each side takes in its timed turn (median, this thread's `ru_minflt`).

The two differ in the process's heap only, not in any code rollwire runs. In a bare process each
side's turn maps fresh pages (a few hundred faults, the kernel zeroing each page): the same cost
on both sides, which lowers the ratio. After the tokenizer's load the heap has room and neither
side faults: the ratio of the work itself, the figure `bench render` reports. Usage:

    python scripts/render_heap.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, sys
if sys.argv[1] == "hf-tokenizer":
    from transformers import AutoTokenizer
    from rollwire.tiny_model import ensure_tiny_model
    held = AutoTokenizer.from_pretrained(str(ensure_tiny_model("qwen2_vl")))
import resource, statistics
import rollwire.bench.render as render
faults = {"bridge": [], "_floor": []}
timed = render._timed
def counted(fn, kept):
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    took = timed(fn, kept)
    faults[fn.func.__name__].append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
    return took
render._timed = counted
render.hf_processor = lambda model_dir: (None, "off")
render.seed_renderer = lambda model_dir, processor: (None, "off")
report = render.run()
print(json.dumps({"turns": {T: [f["rollwire_vs_floor"], f["floor_ms"]] for T, f in report.figures["turns"].items()},
                  "faults": {k: statistics.median(v) for k, v in faults.items()}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2, help="runs of each process kind, alternated")
    args = parser.parse_args()
    for _ in range(args.repeat):
        for kind in ("bare", "hf-tokenizer"):
            out = subprocess.run([sys.executable, "-c", CHILD, kind], check=True, capture_output=True, text=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            figures, faults = result["turns"], result["faults"]
            ratios = ", ".join(f"T={T} {r:.2f}× (floor {fl:.2f} ms)" for T, (r, fl) in figures.items())
            print(f"{kind:13} worst {max(r for r, _ in figures.values()):.2f}×, page faults per turn: rollwire "
                  f"{faults['bridge']:.0f}, floor {faults['_floor']:.0f}; {ratios}", flush=True)


if __name__ == "__main__":
    main()
