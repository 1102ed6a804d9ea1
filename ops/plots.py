"""A loss curve as a PNG, drawn with Pillow (no plotting library in the workers' image)."""
from __future__ import annotations

import io
import math
from typing import Sequence

from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 720, 400, 60


def line_chart_png(xs: Sequence[float], ys: Sequence[float], title: str, xlabel: str, ylabel: str,
                   log_y: bool = True) -> bytes:
    """A single-series line chart with axes, tick labels and a title; y on a log scale by
    default (a diffusion loss spans decades)."""
    im = Image.new("RGB", (WIDTH, HEIGHT), "white")
    d = ImageDraw.Draw(im)
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y) and (y > 0 or not log_y)]
    d.text((MARGIN, 15), title, fill="black")
    left, top, right, bottom = MARGIN, 40, WIDTH - 20, HEIGHT - MARGIN
    d.rectangle([left, top, right, bottom], outline="black")
    d.text(((left + right) // 2 - 20, HEIGHT - 25), xlabel, fill="black")
    d.text((5, top - 20), ylabel, fill="black")
    if pts:
        fy = (lambda y: math.log10(y)) if log_y else (lambda y: y)
        x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
        y0, y1 = min(fy(p[1]) for p in pts), max(fy(p[1]) for p in pts)
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-6)
        px = lambda x: left + (x - x0) / (x1 - x0) * (right - left)
        py = lambda y: bottom - (fy(y) - y0) / (y1 - y0) * (bottom - top)
        d.line([(px(x), py(y)) for x, y in pts], fill=(31, 119, 180), width=2)
        for frac in (0.0, 0.5, 1.0):
            yv = y0 + frac * (y1 - y0)
            label = f"{10 ** yv:.3g}" if log_y else f"{yv:.3g}"
            yy = bottom - frac * (bottom - top)
            d.line([(left - 4, yy), (left, yy)], fill="black")
            d.text((5, yy - 6), label, fill="black")
            xv = x0 + frac * (x1 - x0)
            xx = left + frac * (right - left)
            d.line([(xx, bottom), (xx, bottom + 4)], fill="black")
            d.text((xx - 10, bottom + 8), f"{xv:.0f}", fill="black")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
