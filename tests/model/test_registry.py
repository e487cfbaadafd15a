"""Tests of model/registry.py, and that the model package imports nothing from the layers above it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import model
from model import ModelConfig, create_model, list_models
from model.transformer import Transformer


def test_create_model_builds_the_transformer():
    cfg = ModelConfig(vocab_size=64, max_seq_len=16, d_model=32, n_layers=1, n_heads=2)
    built = create_model("transformer", cfg)
    assert isinstance(built, Transformer)
    assert built.config == cfg
    assert "transformer" in list_models()


def test_create_model_rejects_an_unknown_name_and_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"'nope'.*available:.*transformer"):
        create_model("nope", ModelConfig())


def test_model_package_does_not_import_upper_layers():
    forbidden = {"launcher", "engine", "tools", "data"}
    for path in Path(model.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            bad = [name for name in names if name.split(".")[0] in forbidden]
            assert not bad, f"{path.name} imports {bad}: the model package must not depend on upper layers"
