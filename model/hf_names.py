"""Parameter names between a family of this project and its `transformers` architecture, for families whose blocks
are `layers.N.<name>` here and `model.layers.N.<name>` there: one table per family, one mapping code for all."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import Tensor

_OURS_BLOCK = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_BLOCK = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class LayerNameMap:
    """(ours, transformers') name pairs inside a block and for the whole-model parameters."""

    block: list[tuple[str, str]]
    model: list[tuple[str, str]]
    _to_hf: dict[str, dict[str, str]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_to_hf", {"block": dict(self.block), "model": dict(self.model),
                                            "block_back": {hf: ours for ours, hf in self.block},
                                            "model_back": {hf: ours for ours, hf in self.model}})

    def to_hf(self, name: str) -> str:
        """Our parameter name -> the transformers architecture's (KeyError for a name it has no place for)."""
        if m := _OURS_BLOCK.match(name):
            return f"model.layers.{m.group(1)}.{self._to_hf['block'][m.group(2)]}"
        return self._to_hf["model"][name]

    def from_hf(self, name: str) -> str:
        """The transformers architecture's parameter name -> ours (KeyError for a name ours has no place for)."""
        if m := _HF_BLOCK.match(name):
            return f"layers.{m.group(1)}.{self._to_hf['block_back'][m.group(2)]}"
        return self._to_hf["model_back"][name]

    def to_hf_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        return {self.to_hf(k): v for k, v in state_dict.items()}

    def from_hf_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        return {self.from_hf(k): v for k, v in state_dict.items()}
