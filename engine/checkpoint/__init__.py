"""Checkpoint storage and weights out: resumable folders (manager, commit protocol), the one safe loader, universal
checkpoints for another rank count, and export to `.pt`, safetensors and Hugging Face folders."""
