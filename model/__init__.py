"""Model families (Transformer, Mamba) and their typed config."""
from model.config import ModelConfig
from model.registry import create_model, list_models

__all__ = ["ModelConfig", "create_model", "list_models"]
