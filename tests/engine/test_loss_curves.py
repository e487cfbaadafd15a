"""engine/evaluation/loss_curves.py: curves written with torch's SummaryWriter come back from EventAccumulator (resumed runs
merged, per-source validation curves kept), and both drawing paths write a PNG."""
from __future__ import annotations

import sys

from torch.utils.tensorboard import SummaryWriter

from engine.evaluation.loss_curves import plot_loss_curves, read_scalar_curves


def test_curves_round_trip_through_tensorboard(tmp_path, monkeypatch):
    first = SummaryWriter(str(tmp_path))
    for step in (1, 2, 3):
        first.add_scalar("train/loss", 10.0 - step, step)
        first.add_scalar("train/lr", 0.1, step)
    first.add_scalar("val/loss", 8.5, 3)
    first.close()
    resumed = SummaryWriter(str(tmp_path))  # a relaunch appends a second event file
    resumed.add_scalar("train/loss", 6.5, 3)  # step 3 again: the later file wins
    resumed.add_scalar("train/loss", 6.0, 4)
    resumed.add_scalar("val/loss/wiki", 7.0, 4)
    resumed.close()
    curves = read_scalar_curves(tmp_path)
    assert curves == {"train/loss": [(1, 9.0), (2, 8.0), (3, 6.5), (4, 6.0)], "val/loss": [(3, 8.5)],
                      "val/loss/wiki": [(4, 7.0)]}
    png = plot_loss_curves(curves, tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if matplotlib were not installed
    assert plot_loss_curves(curves, tmp_path / "b.png") == "pillow"
    from PIL import Image

    with Image.open(tmp_path / "b.png") as image:
        assert image.size == (800, 450) and len(set(image.getdata())) > 3  # axes, two colours, text
    assert png in ("matplotlib", "pillow")
