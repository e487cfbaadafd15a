"""The after-training report: results as JSON and Markdown (with the loss-curve PNG) in one folder, written
to temporary names and renamed so that an interrupted evaluation leaves no half-written report."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data.output import check_output, staged_output


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def render_markdown(report: dict[str, Any]) -> str:
    """The report dict (as written to JSON) as Markdown."""
    lines = [f"# Evaluation of `{report['checkpoint']}`", "",
             f"- kind: {report['kind']}; model: {report.get('model', 'n/a')}",
             f"- evaluated: {report['created_utc']} on {report['device']}", ""]
    lines += ["## Scores", "", "| set | tokens | bytes | nats/token | perplexity | bits/byte |", "|---|---|---|---|---|---|"]
    for name, score in report["scores"].items():
        lines.append(f"| {name} | {score['num_tokens']} | {_fmt(score['num_bytes'])} | {_fmt(score['nll_per_token'])} "
                     f"| {_fmt(score['perplexity'])} | {_fmt(score['bits_per_byte'])} |")
    if "lambada" in report:
        lam = report["lambada"]
        lines += ["", f"LAMBADA last-word accuracy: {lam['accuracy']:.4f} over {lam['num_examples']} passages"]
    for note in report.get("notes", []):
        lines += ["", f"- note: {note}"]
    if report.get("loss_curve"):
        lines += ["", "## Loss curves", "", f"![loss curves]({Path(report['loss_curve']).name})"]
    lines += ["", "## Samples", "", f"Sampling: {json.dumps(report['sampling'])}", ""]
    for sample in report["samples"]:
        lines += [f"**prompt** `{sample['prompt']}`", "", "```text", sample["text"], "```", ""]
    return "\n".join(lines) + "\n"


def report_paths(folder: str | Path, stem: str) -> tuple[Path, Path, Path]:
    """The JSON, Markdown and loss-curve PNG of a report."""
    folder = Path(folder)
    return folder / f"{stem}.json", folder / f"{stem}.md", folder / f"{stem}_loss.png"


def check_report_paths(folder: str | Path, stem: str, *, overwrite: bool, inputs: list) -> None:
    """OutputError now, before an evaluation that may take long, if the report could not be written."""
    for path in report_paths(folder, stem):
        check_output(path, overwrite=overwrite, inputs=inputs, what="report")


def write_report(report: dict[str, Any], folder: str | Path, stem: str, *, overwrite: bool = False,
                 inputs: list = ()) -> tuple[Path, Path]:
    """Write `<stem>.json` and `<stem>.md` into folder through the one writer (data/output.py); returns their
    paths."""
    json_path, md_path, _ = report_paths(folder, stem)
    for path, text in ((json_path, json.dumps(report, indent=2, ensure_ascii=False) + "\n"),
                       (md_path, render_markdown(report))):
        with staged_output(path, overwrite=overwrite, inputs=inputs, what="report") as tmp:
            tmp.write_text(text, encoding="utf-8")
    return json_path, md_path
