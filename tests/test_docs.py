"""The docs stay runnable: every script a command in README.md or docs/*.md names exists, every Python script
answers --help, every dry run in them plans, and every relative link points at a file."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"(?:^|[\s`$])(?:python|bash|deepspeed(?: --num_gpus \d+)?)\s+((?:launcher|tools|scripts|examples)/[\w/.-]+\.(?:py|sh)|train\.py)")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def code_lines(path):
    """Lines inside ``` fences and `inline code` spans of one Markdown file."""
    inside = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            inside = not inside
            continue
        if inside:
            yield line
        else:
            yield from re.findall(r"`([^`]+)`", line)


def documented_scripts():
    found = {}
    for doc in DOCS:
        for line in code_lines(doc):
            for script in COMMAND.findall(line):
                found.setdefault(script, doc.relative_to(REPO_ROOT).as_posix())
    return found


SCRIPTS = documented_scripts()


def test_docs_name_scripts():
    assert {"launcher/run.py", "tools/convert_checkpoint.py", "scripts/test.sh"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_documented_script_exists(script):
    assert (REPO_ROOT / script).is_file(), f"{SCRIPTS[script]} runs {script}, which does not exist"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if "://" in target:
            continue
        assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(s for s in SCRIPTS if s.endswith(".py")))
def test_documented_script_answers_help(script):
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    result = subprocess.run([sys.executable, script, "--help"], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"{script} --help: exit {result.returncode}\n{result.stderr[-2000:]}"
    assert "usage" in result.stdout.lower()


def documented_dry_runs():
    """(command, the `error:` line the doc shows after it or None) for every documented dry run that plans for
    hardware it names (--gpu_memory). Dry runs that plan for the machine at hand, or need a hostfile the reader
    writes, are checked by the --help and existence tests only: their outcome depends on that machine or file."""
    runs = {}
    for doc in DOCS:
        lines = list(code_lines(doc))
        for i, line in enumerate(lines):
            line = line.strip().removeprefix("$ ")
            if not (line.startswith("python launcher/run.py") and "--dry_run" in line and "--gpu_memory" in line):
                continue
            if re.search(r"\b[A-Z]{3,}\b", line) or "--hostfile" in line:
                continue
            shown = next((later.strip() for later in lines[i + 1:i + 60] if later.strip().startswith("error:")
                          or later.strip().startswith("$ ") or later.strip().startswith("python ")), "")
            runs[line.split("#")[0].strip()] = shown if shown.startswith("error:") else None
    return sorted(runs.items())


@pytest.mark.slow
@pytest.mark.parametrize("command,error", documented_dry_runs())
def test_documented_dry_run_plans(command, error, tmp_path):
    """Each documented dry run plans as written, or ends with the error its doc shows (exit 2)."""
    env = {k: v for k, v in os.environ.items() if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT"}}
    env["DS_ACCELERATOR"] = "cpu"
    argv = command.split()[1:]
    result = subprocess.run([sys.executable, *argv, "--set", f"training.output_dir={tmp_path}"], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=180)
    output = result.stdout + result.stderr
    if error is None:
        assert result.returncode == 0, f"{command}: exit {result.returncode}\n{output[-3000:]}"
    else:
        assert result.returncode == 2 and error[:80] in output, f"{command}: expected {error!r}\n{output[-3000:]}"
