"""The loss curves of a run, read back from its TensorBoard logs and drawn as a PNG.

Reading uses tensorboard's own EventAccumulator (the format's reference reader). Drawing uses matplotlib when it is
installed; otherwise Pillow, which tensorboard already depends on, draws a plain line chart (axes, ticks, two
series, a legend), so the report always has its picture without adding a plotting library to the requirements.
"""
from __future__ import annotations

import math
from pathlib import Path

TRAIN_TAG, VAL_TAG = "train/loss", "val/loss"
"""The scalar tags MetricsLogger writes."""

Curve = list[tuple[int, float]]


def _wanted(tag: str, tags: tuple[str, ...]) -> bool:
    # A mixture of data sources also logs one validation curve per source: val/loss/<source>.
    return tag in tags or any(tag.startswith(f"{t}/") for t in tags)


def read_scalar_curves(log_dir: str | Path, tags: tuple[str, ...] = (TRAIN_TAG, VAL_TAG)) -> dict[str, Curve]:
    """{tag: [(step, value), ...]} over every event file under log_dir (several when a run was resumed), for each
    of `tags` and the tags below them (`val/loss/<source>`); a later file's value for the same step wins. Tags that
    were never written are absent."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    merged: dict[str, dict[int, float]] = {}
    for events in sorted(Path(log_dir).rglob("events.out.tfevents.*"), key=lambda p: (p.stat().st_mtime_ns, p.name)):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})  # 0 = keep every point
        accumulator.Reload()
        for tag in (t for t in accumulator.Tags().get("scalars", []) if _wanted(t, tags)):
            merged.setdefault(tag, {}).update({e.step: e.value for e in accumulator.Scalars(tag)})
    return {tag: sorted(points.items()) for tag, points in merged.items()}


def plot_loss_curves(curves: dict[str, Curve], path: str | Path, *, title: str = "loss") -> str:
    """Write the curves to a PNG at path; returns which library drew it ('matplotlib' or 'pillow')."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib
    except ImportError:
        _plot_with_pillow(curves, path, title=title)
        return "pillow"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for tag, points in curves.items():
        ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=tag)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return "matplotlib"


_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    span = (high - low) or 1.0
    raw = span / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if m * step >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 1)]


def _plot_with_pillow(curves: dict[str, Curve], path: Path, *, title: str) -> None:
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 800, 450, 70, 20, 40, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    points = [p for curve in curves.values() for p in curve]
    steps, values = [s for s, _ in points] or [0, 1], [v for _, v in points] or [0, 1]
    x0, x1 = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1
    y0, y1 = min(values), max(values) if max(values) > min(values) else min(values) + 1
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad

    def xy(step: float, value: float) -> tuple[float, float]:
        return (left + (step - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (value - y0) / (y1 - y0) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for tick in _nice_ticks(x0, x1):
        x, _ = xy(tick, y0)
        draw.line([x, height - bottom, x, height - bottom + 5], fill="black")
        draw.text((x - 10, height - bottom + 8), f"{tick:g}", fill="black")
    for tick in _nice_ticks(y0, y1):
        _, y = xy(x0, tick)
        draw.line([left - 5, y, left, y], fill="black")
        draw.line([left, y, width - right, y], fill=(230, 230, 230))
        draw.text((5, y - 6), f"{tick:.3g}", fill="black")
    draw.text((width // 2 - 15, height - 18), "step", fill="black")
    draw.text((left, 12), f"{title} (nats/token)", fill="black")
    for i, (tag, curve) in enumerate(curves.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        line = [xy(s, v) for s, v in curve]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for x, y in line if len(line) < 30 else []:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.line([width - right - 120, top + 15 + 16 * i, width - right - 100, top + 15 + 16 * i], fill=colour,
                  width=3)
        draw.text((width - right - 95, top + 9 + 16 * i), tag, fill="black")
    image.save(path, format="PNG")
