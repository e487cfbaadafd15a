"""tools/check_env.py and engine/diagnostics/environment.py: the table's verdicts against DeepSpeed's own op builders and
forced failures, the exit code, and the real training run."""
from __future__ import annotations

import importlib.metadata
import shutil
from collections import namedtuple

import pytest

import engine.diagnostics.environment as environment
from engine.diagnostics.environment import Check, check_free_disk, check_packages, deepspeed_op_facts
from tools import check_env


def test_op_facts_agree_with_deepspeed_builders():
    from deepspeed.ops.op_builder.all_ops import ALL_OPS

    facts = {f["op"]: f for f in deepspeed_op_facts()}
    assert set(facts) == set(ALL_OPS)
    for name, builder in ALL_OPS.items():
        try:
            expected = bool(builder.is_compatible(verbose=False))
        except Exception:  # noqa: BLE001
            expected = False
        assert facts[name]["compatible"] == expected, name


def test_a_missing_package_fails_with_the_install_fix(monkeypatch):
    real = importlib.metadata.version

    def version(name):
        if name == "sentencepiece":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    [check] = [c for c in check_packages() if c.name == "sentencepiece"]
    assert check.status == "fail" and "requirements.txt" in check.fix


@pytest.mark.parametrize("free, status", [(512 << 20, "fail"), (5 << 30, "warn"), (50 << 30, "ok")])
def test_free_disk_thresholds(monkeypatch, tmp_path, free, status):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(100 << 30, 0, free))
    assert check_free_disk("checkpoints", tmp_path / "not" / "yet").status == status


def test_exit_code_says_whether_training_can_start(monkeypatch, capsys):
    checks = [Check(name="python", status="ok", detail="3.11")]
    monkeypatch.setattr(check_env, "environment_checks", lambda **kw: list(checks))
    assert check_env.main(["--skip_training"]) == 0
    checks.append(Check(name="torch", status="fail", detail="1.13", fix="pip install torch==2.13.0"))
    assert check_env.main(["--skip_training"]) == 1
    assert check_env.main([]) == 1  # training is not attempted after a failure
    out = capsys.readouterr().out
    assert "fix: pip install torch==2.13.0" in out and "training cannot start: torch" in out
    assert "not attempted" in out


@pytest.mark.slow
def test_the_training_run_trains_for_real(data_cache):
    check = check_env.training_check(str(data_cache), timeout_s=600)
    assert check.status == "ok", check
    assert "validation loss" in check.detail and "final_model.pt written" in check.detail


def test_the_table_on_this_machine():
    checks = environment.environment_checks(cache_dir=".", checkpoint_dir=".")
    names = [c.name for c in checks]
    for wanted in ("python", "torch", "CUDA", "deepspeed", "deepspeed ops", "mamba-ssm kernels",
                   "FlashAttention (SDPA)", "sentencepiece", "datasets", "tensorboard", "disk: data cache"):
        assert wanted in names
    assert all(c.status in ("ok", "info", "warn", "fail") for c in checks)
