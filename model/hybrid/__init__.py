"""The hybrid family: Mamba-2 and attention layers in one model (transformers' BambaForCausalLM)."""
from model.hybrid.model import HybridLM

__all__ = ["HybridLM"]
