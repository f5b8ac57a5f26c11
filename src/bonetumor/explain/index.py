"""``index.html`` of an explain folder: every panel, errors first, filterable by outcome.

A reader looks for the failures first: false negatives (missed disease), then false positives,
each most confident first, then the correct ones; images without a known truth come last. Every
caption says truth and prediction; the colour bar says what the heatmap's colours mean.
"""

from __future__ import annotations

import html
from collections import Counter
from pathlib import Path

import numpy as np

ORDER = ("false negative", "false positive", "wrong", "true positive", "true negative", "correct", "unknown")


def sort_rows(rows: list[dict]) -> list[dict]:
    """Errors first (false negatives, false positives), each group most confident first."""
    def key(r: dict):
        return ORDER.index(r.get("outcome", "unknown")), -abs(float(r["probability"]) - 0.5)
    return sorted(rows, key=key)


def colour_bar_png() -> str:
    """A horizontal jet colour bar as a data URI (the heatmap's colours, low to high)."""
    import base64
    import io

    import matplotlib
    from PIL import Image

    ramp = (matplotlib.colormaps["jet"](np.linspace(0, 1, 256))[None, :, :3] * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.repeat(ramp, 14, axis=0)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def index_page(rows: list[dict], title: str, warning: str | None) -> str:
    """The page: a warning when the maps are too coarse, the colour bar, filter buttons and the panels."""
    shown = [r for r in sort_rows(rows) if r.get("panel")]
    counts = Counter(r.get("outcome", "unknown") for r in shown)
    buttons = "".join(f'<button data-f="{html.escape(o)}">{html.escape(o)}s ({counts[o]})</button>'
                      for o in ORDER if counts[o])
    cards = []
    for r in shown:
        name = Path(r["path"]).name + ("" if r.get("slice") is None else f" slice {r['slice']}")
        truth = f"truth <b>{html.escape(r['truth'])}</b> · " if r.get("truth") else ""
        extra = f" · pointing {'hit' if r['pointing'] else 'miss'}" if "pointing" in r else ""
        o = r.get("outcome", "unknown")
        cards.append(f'<figure data-o="{html.escape(o)}" class="{"err" if o.startswith("false") or o == "wrong" else ""}">'
                     f'<img src="{html.escape(r["panel"])}" alt="{html.escape(name)}" loading="lazy">'
                     f'<figcaption><span class="tag">{html.escape(o)}</span> {html.escape(name)}<br>{truth}predicted '
                     f'<b>{html.escape(r["prediction"])}</b> · P {r["probability"]:.3f}{extra}</figcaption></figure>')
    warn = f'<p class="warn"><b>Warning:</b> {html.escape(warning)}.</p>' if warning else ""
    return _PAGE.format(title=html.escape(title), n=len(rows), shown=len(shown), warn=warn, bar=colour_bar_png(),
                        buttons=buttons, cards="\n".join(cards))


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>bonetumor explain: {title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:system-ui,sans-serif;margin:1rem;color:#1d2330}}
main{{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(420px,100%),1fr));gap:1rem}}
figure{{margin:0;padding:4px;border-radius:6px}}figure.err{{background:#fdecea}}img{{width:100%;height:auto;border:1px solid #ccc}}
figcaption{{font-size:.85rem;overflow-wrap:anywhere}}.tag{{font-weight:600;text-transform:uppercase;font-size:.75rem}}
.warn{{background:#fff4e0;border-left:4px solid #e69500;padding:8px 12px}}
.bar{{display:flex;align-items:center;gap:8px;font-size:.85rem;flex-wrap:wrap}}.bar img{{width:200px;height:14px;border:0}}
button{{margin:0 6px 6px 0;padding:4px 10px;border:1px solid #99a;border-radius:4px;background:#fff;cursor:pointer}}
button.on{{background:#1d2330;color:#fff}}</style></head>
<body><h1>{title}</h1>{warn}
<p>{n} images, {shown} with panels, errors first. Each panel: image | heatmap | overlay (lesion outline in green
when known). Research tool, not a diagnostic device.</p>
<div class="bar">heatmap: <span>low evidence</span><img src="{bar}" alt="colour bar from blue (low) to red (high)"><span>high evidence for the explained class</span></div>
<p><button data-f="all" class="on">all</button>{buttons}</p>
<main>
{cards}
</main>
<script>
document.querySelectorAll('button[data-f]').forEach(b => b.onclick = () => {{
  document.querySelectorAll('button[data-f]').forEach(x => x.classList.toggle('on', x === b));
  document.querySelectorAll('figure[data-o]').forEach(f => f.hidden = b.dataset.f !== 'all' && f.dataset.o !== b.dataset.f);
}});
</script></body></html>
"""
