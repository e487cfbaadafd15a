"""The data layer's own typed config."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class DataSourceConfig(BaseModel):
    """One source of a training mixture."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    path: str
    """A shard-set folder (tools/preprocess_data.py), a Megatron `.bin/.idx` prefix, local .txt/.jsonl/.json/
    .parquet files (file, glob or folder; prepared into cache_dir on first use) or a catalog name."""
    weight: float = 1.0
    """Mixture weight (relative; 0 = evaluate only)."""
    name: str | None = None
    """Name in logs and checkpoints (default: the folder or file name)."""
    text_field: str = "text"
    """JSON/parquet column with the text, for raw local files."""

    @property
    def display_name(self) -> str:
        """The name, or one derived from the path."""
        if self.name:
            return self.name
        stem = self.path.rstrip("/").split("/")[-1]
        return stem.split(".")[0].replace("*", "") or self.path


class DataConfig(BaseModel):
    """Which corpus to train on, and where its tokenizer and token shards are cached."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    dataset: str = "shakespeare"
    """Corpus name from the dataset catalog ('shakespeare' is the embedded default)."""
    cache_dir: str = "./data_cache"
    """Folder for the trained tokenizer and token shards; later runs reuse them."""
    val_fraction: float = 0.05
    """Fraction of documents held out for validation."""
    split_seed: int = 1234
    """Seed of the train/validation document split."""
    sources: list[DataSourceConfig] = Field(default_factory=list)
    """Train on this weighted mixture instead of `dataset` (empty = the single catalog corpus `dataset`)."""
    tokenizer: str | None = None
    """SentencePiece model for sources: checked against the shards' recorded hash, used to prepare raw files
    (default: the shard sets' own tokenizer.model; trained on the first raw source if there is none)."""

    @field_validator("val_fraction")
    @classmethod
    def _fraction(cls, value: float) -> float:
        if not 0.0 < value < 0.5:
            raise ValueError("must be in (0, 0.5), e.g. 0.05")
        return value

    @model_validator(mode="after")
    def _check_sources(self) -> "DataConfig":
        problems = [f"data.sources[{i}].weight must be >= 0, got {source.weight}"
                    for i, source in enumerate(self.sources) if not source.weight >= 0]
        if self.sources and not problems and sum(source.weight for source in self.sources) <= 0:
            problems.append("data.sources weights are all zero: give at least one source a positive weight")
        names = [source.display_name for source in self.sources]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            problems.append(f"data.sources names repeat ({', '.join(duplicates)}): set `name:` on each")
        if problems:
            raise ValueError("; ".join(problems))
        return self
