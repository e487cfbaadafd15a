"""tools/throughput.py --sequence_parallel: refused without as many ranks; the SP column in the Markdown table."""
from __future__ import annotations

import pytest

from tools import throughput


def test_sequence_parallel_needs_as_many_ranks(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        throughput.parse_args(["--preset", "tiny_long", "--sequence_parallel", "2"])
    assert exit_info.value.code == 2
    assert "torchrun --nproc_per_node 2" in capsys.readouterr().err


def test_markdown_table_has_the_sequence_parallel_column():
    result = {"tokens_per_s": {"median": 495.0, "min": 474.0, "max": 518.0}, "tflops": 0.0181, "mfu": None,
              "peak_memory_bytes": None, "final_loss": 9.07}
    report = {"preset": "tiny_long", "device": "CPU", "precision": "fp32", "layout": "ZeRO-0", "micro_batch": 4,
              "seq_len": 1024, "sequence_parallel": 2, "results": {"deepspeed": result},
              "predicted_allocated_bytes": None}
    header, _, row = throughput.markdown_table([report]).splitlines()
    assert header.split(" | ")[4] == "SP" and row.split(" | ")[4] == "2"
