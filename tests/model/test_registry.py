"""Tests of model/registry.py."""
from __future__ import annotations

import pytest

from model import ModelConfig, create_model, list_models
from model.transformer.model import Transformer


def test_create_model_builds_the_transformer():
    cfg = ModelConfig(vocab_size=64, max_seq_len=16, d_model=32, n_layers=1, n_heads=2)
    built = create_model("transformer", cfg)
    assert isinstance(built, Transformer)
    assert built.config == cfg
    assert "transformer" in list_models()


def test_create_model_rejects_an_unknown_name_and_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"'nope'.*available:.*transformer"):
        create_model("nope", ModelConfig())
