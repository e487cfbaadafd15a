"""The data layer's own typed config."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, field_validator


class DataConfig(BaseModel):
    """Which corpus to train on, and where its tokenizer and token shards are cached."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    dataset: str = "shakespeare"
    """Corpus name from the dataset catalog ('shakespeare' is the embedded default)."""
    cache_dir: str = "./data_cache"
    """Folder for the trained tokenizer and token shards; later runs reuse them."""
    val_fraction: float = 0.05
    """Fraction of documents held out for validation."""
    split_seed: int = 1234
    """Seed of the train/validation document split."""

    @field_validator("val_fraction")
    @classmethod
    def _fraction(cls, value: float) -> float:
        if not 0.0 < value < 0.5:
            raise ValueError("must be in (0, 0.5), e.g. 0.05")
        return value
