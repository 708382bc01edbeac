"""The render benchmark's rollwire / floor ratio in two fresh processes: a bare one, and one that has
loaded the HF tokenizer first (as `rollwire bench render` does for its HF baseline).

The two differ in the process's heap only, not in any code rollwire runs. A scratch timer (not this
script) put the difference in rollwire's patchify: 0.65 ms per 644×476 image in a bare process,
1.1-1.2 ms after the HF tokenizer was loaded, about what writing 1.8 MB onto pages the process has
not touched yet costs on this machine; the resize took the same in both. Usage:

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
import rollwire.bench.render as render
render.hf_processor = lambda model_dir: (None, "off")
render.seed_renderer = lambda model_dir, processor: (None, "off")
report = render.run()
print(json.dumps({T: [f["rollwire_vs_floor"], f["floor_ms"]] for T, f in report.figures["turns"].items()}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2, help="runs of each process kind, alternated")
    args = parser.parse_args()
    for _ in range(args.repeat):
        for kind in ("bare", "hf-tokenizer"):
            out = subprocess.run([sys.executable, "-c", CHILD, kind], check=True, capture_output=True, text=True)
            figures = json.loads(out.stdout.strip().splitlines()[-1])
            ratios = ", ".join(f"T={T} {r:.2f}× (floor {fl:.2f} ms)" for T, (r, fl) in figures.items())
            print(f"{kind:13} worst {max(r for r, _ in figures.values()):.2f}×: {ratios}", flush=True)


if __name__ == "__main__":
    main()
