"""The decoder-only Transformer family: the model, its rotary embedding (fused and reference), its per-token costs
and its mapping to transformers' LlamaForCausalLM."""
from model.transformer.model import Transformer

__all__ = ["Transformer"]
