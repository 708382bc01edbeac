"""The page's one stylesheet and one script, inline; the Content-Security-Policy allows exactly these
(by hash) and data: images, so the page never reaches the network and injected markup cannot run."""

from __future__ import annotations

import base64
import hashlib

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1160px;padding:16px;color:#1d1d1f;background:#fafafa}
h1{font-size:22px;margin:0 0 8px}h2{font-size:17px;margin:0}h3{font-size:14px;margin:12px 0 4px}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ddd;padding:2px 8px;text-align:left;
vertical-align:top}th{background:#f0f0f0}
.grid{display:flex;flex-wrap:wrap;gap:16px}.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px}
.chart rect{fill:#4a7bd0}.chart text{font-size:10px;fill:#333}
pre{white-space:pre-wrap;word-break:break-word;margin:0;font:12px/1.4 ui-monospace,monospace}
.rollout{background:#fff;border:1px solid #ccc;border-radius:6px;margin:18px 0;padding:10px}
.meta{color:#555;font-size:12px;margin:4px 0}.error{background:#fde8e8;border:1px solid #e0a0a0;padding:6px;
border-radius:4px;margin:6px 0}
.turns{list-style:none;padding:0;margin:0}.turn{border-top:2px solid #e4e4e4;padding:8px 0}
.turn-head{font-weight:600;font-size:12px;color:#333;margin-bottom:4px}.reward{color:#0a7a32}
.msg{border-left:4px solid #bbb;margin:4px 0;padding:4px 8px;background:#f7f7f7}
.msg .role{font-size:11px;text-transform:uppercase;color:#666;letter-spacing:.05em}
.msg.system{border-color:#999}.msg.user{border-color:#4a7bd0}.msg.tool{border-color:#c08a1e}
.msg.assistant{border-color:#2e9d57;background:#f1faf4}
.text{white-space:pre-wrap;word-break:break-word}
.thumb{display:block;margin:4px 0;border:1px solid #ccc;background:#eee;max-width:100%;height:auto}
.noimg{display:inline-block;padding:8px;border:1px dashed #c66;color:#a33;font-size:12px}
.sampled{white-space:pre-wrap;word-break:break-word;font:13px/1.7 ui-monospace,monospace}
.tok{border:1px solid #c9d6c9;border-radius:2px;margin:0 1px 0 0;padding:0 1px}
.tok.special{color:#8a2be2;font-style:italic}.tok.p0{background:#fbd3d3}.tok.p1{background:#fde6c8}
.tok.p2{background:#fdf6c3}.tok.p3{background:#e2f5d5}.tok.p4{background:#cdeecd}.tok.pn{background:#eee}
.call{font:12px ui-monospace,monospace;background:#fff8e6;border:1px solid #e8d29a;padding:2px 6px;margin:3px 0}
a{color:#2a5db0}#rw-status{font-size:11px;color:#888}
"""

JS = """
(function () {
  var urls = JSON.parse(document.getElementById("rw-images").textContent);
  var status = document.getElementById("rw-status");
  var imgs = document.querySelectorAll("img[data-image]");
  var loaded = 0, failed = 0;
  status.setAttribute("data-turns", String(document.querySelectorAll(".turn").length));
  function report() {
    status.setAttribute("data-loaded", String(loaded));
    status.setAttribute("data-failed", String(failed));
    if (loaded + failed === imgs.length) {
      status.setAttribute("data-complete", "1");
      status.textContent = loaded + " of " + imgs.length + " images shown";
      var first = null;
      for (var i = 0; i < imgs.length && !first; i++) { if (imgs[i].naturalWidth > 0) { first = imgs[i]; } }
      if (first) {
        var r = first.getBoundingClientRect();
        status.setAttribute("data-first-image", [r.left + window.scrollX, r.top + window.scrollY,
                                                 r.width, r.height].map(Math.round).join(","));
      }
    }
  }
  Array.prototype.forEach.call(imgs, function (img) {
    var url = Object.prototype.hasOwnProperty.call(urls, img.getAttribute("data-image"))
      ? urls[img.getAttribute("data-image")] : null;
    if (!url) { failed++; return; }
    img.onload = function () { if (img.naturalWidth > 0) { loaded++; } else { failed++; } report(); };
    img.onerror = function () { failed++; report(); };
    img.src = url;
  });
  report();
})();
"""


def _sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


CSP = (f"default-src 'none'; img-src data:; style-src '{_sha256(CSS)}'; script-src '{_sha256(JS)}'; "
       "base-uri 'none'; form-action 'none'")
