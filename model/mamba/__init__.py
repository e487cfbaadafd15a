"""The Mamba family: the language model, its Mamba-2 / Mamba-1 mixers, their scans and ops (fused and reference side
by side), per-token costs and the mapping to transformers' Mamba2ForCausalLM / MambaForCausalLM."""
from model.mamba.model import MambaLM

__all__ = ["MambaLM"]
