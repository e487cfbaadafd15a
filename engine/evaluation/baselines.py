"""Scoring this project's checkpoints and pretrained `transformers` baselines on the same texts in bits per byte.

Each model is scored with its own tokenizer; the texts' UTF-8 bytes are the common denominator
(engine/evaluation/scoring.py), so a 8k-vocabulary SentencePiece model and GPT-NeoX's 50k BPE compare directly.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from engine.evaluation.scoring import LogitsFn, TextScore, model_logits_fn, score_texts

BASELINES = {
    # Biderman et al. 2023 (arXiv:2304.01373): GPT-NeoX architecture, trained on the Pile.
    "pythia-160m": "EleutherAI/pythia-160m",
    # Gu & Dao 2023 (arXiv:2312.00752), the transformers-format release; also trained on the Pile.
    "mamba-130m": "state-spaces/mamba-130m-hf",
}
"""Small pretrained baselines: short name -> hub repository."""


@dataclass(kw_only=True)
class Scorable:
    """A model and its tokenizer, ready for score_texts."""

    name: str
    """Label in the table."""
    logits_fn: LogitsFn
    """idx (B, T) -> logits (B, T, V)."""
    encode: Callable[[str], list[int]]
    """Text -> token ids, without special tokens."""
    separator_id: int
    """The token between documents (eos)."""
    context: int
    """Window length used for scoring."""


def scorable_checkpoint(name: str, model: torch.nn.Module, tokenizer, max_seq_len: int) -> Scorable:
    """One of this project's models with its SentencePiece tokenizer (documents are separated by eos)."""
    return Scorable(name=name, logits_fn=model_logits_fn(model), encode=tokenizer.encode,
                    separator_id=tokenizer.eos_id, context=max_seq_len)


def load_transformers_baseline(name_or_path: str, *, local_only: bool, max_context: int = 1024,
                               device: str = "cpu") -> Scorable:
    """A causal LM and its tokenizer through transformers (from the local cache only when local_only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    repo = BASELINES.get(name_or_path, name_or_path)
    if Path(repo).is_dir():  # a local folder: its pickles (pytorch_model.bin) pass the one loader's check first
        from engine.checkpoint.safe_load import check_tree

        check_tree(repo)
    tokenizer = AutoTokenizer.from_pretrained(repo, local_files_only=local_only)
    model = AutoModelForCausalLM.from_pretrained(repo, local_files_only=local_only, dtype=torch.float32)
    model.to(device).eval()
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if separator is None:
        raise ValueError(f"{repo}: its tokenizer has neither an eos nor a bos token to separate documents")
    positions = getattr(model.config, "max_position_embeddings", None) or max_context
    return Scorable(name=Path(repo).name if Path(repo).exists() else repo, logits_fn=model_logits_fn(model),
                    encode=lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
                    separator_id=int(separator), context=min(positions, max_context))


def score_all(models: list[Scorable], texts: list[str], *, batch_size: int = 4, device: str = "cpu",
              progress: bool = True) -> dict[str, TextScore]:
    """Every model on the same texts."""
    with torch.no_grad():
        return {m.name: score_texts(m.logits_fn, texts, encode=m.encode, separator_id=m.separator_id,
                                    window=m.context, batch_size=batch_size, device=device, progress=progress,
                                    desc=m.name) for m in models}
