"""Scoring language models on text: perplexity, bits per byte, LAMBADA last-word accuracy.

Bits per byte is the tokenizer-independent measure (Gao et al. 2020, The Pile, arXiv:2101.00027, section 5.1):
the summed cross-entropy of every predicted token, in bits, divided by the UTF-8 bytes of the text those tokens
spell. Two models with different tokenizers scored on the same texts are directly comparable; perplexity is not.

Every function takes a `logits_fn(idx (B, T)) -> logits (B, T, V)`, so this project's models and any
`transformers` model are scored by the same code.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

LogitsFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True, kw_only=True)
class TextScore:
    """Summed cross-entropy of a token stream, and what it means per token and per byte."""

    total_nll: float
    """Sum of -ln p(token) over every predicted token, in nats."""
    num_tokens: int
    """Number of predicted tokens."""
    num_bytes: int | None
    """UTF-8 bytes of the text the predicted tokens spell (None when unknown)."""

    @property
    def nll_per_token(self) -> float:
        """Mean cross-entropy in nats per token (the training loss)."""
        return self.total_nll / self.num_tokens

    @property
    def perplexity(self) -> float:
        """exp(mean nats per token); depends on the tokenizer."""
        return math.exp(self.nll_per_token)

    @property
    def bits_per_byte(self) -> float | None:
        """Summed cross-entropy in bits over the text's UTF-8 bytes; independent of the tokenizer."""
        return None if not self.num_bytes else self.total_nll / math.log(2) / self.num_bytes

    def as_dict(self) -> dict[str, float | int | None]:
        return {"nll_per_token": self.nll_per_token, "perplexity": self.perplexity,
                "bits_per_byte": self.bits_per_byte, "num_tokens": self.num_tokens, "num_bytes": self.num_bytes}


def model_logits_fn(model: nn.Module) -> LogitsFn:
    """logits_fn of a model whose forward returns (logits, loss) (this project's) or an object with .logits
    (transformers')."""
    def logits_fn(idx: Tensor) -> Tensor:
        out = model(idx)
        return out[0] if isinstance(out, tuple) else out.logits
    return logits_fn


@torch.no_grad()
def stream_nll(logits_fn: LogitsFn, tokens: Sequence[int] | np.ndarray | Tensor, *, window: int, batch_size: int = 8,
               device: torch.device | str = "cpu", max_tokens: int | None = None, progress: bool = False,
               desc: str = "score") -> tuple[float, int]:
    """(summed nats, number of predicted tokens) of a token stream, every token after the first predicted once.

    The stream is cut into windows of window + 1 tokens that overlap by one (as the trainer's TokenWindows), so
    each window predicts `window` tokens from the context inside it; the last window may be shorter.
    max_tokens stops after that many predicted tokens (the first ones of the stream).
    """
    tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64)) if not isinstance(tokens, Tensor) else tokens.long()
    num_predicted = len(tokens) - 1
    if max_tokens is not None:
        num_predicted = min(num_predicted, max_tokens)
    if num_predicted < 1:
        raise ValueError(f"need at least 2 tokens to score, got {len(tokens)}")
    starts = list(range(0, num_predicted, window))
    total, count = 0.0, 0
    bar = tqdm(total=num_predicted, desc=desc, unit="tok", disable=not progress, mininterval=1.0)
    for first in range(0, len(starts), batch_size):
        group = starts[first:first + batch_size]
        lengths = [min(window, num_predicted - s) for s in group]
        full = [s for s, n in zip(group, lengths) if n == window]
        # Full windows go as one batch; a short last window alone (no padding, so no mask is needed).
        batches = ([torch.stack([tokens[s:s + window + 1] for s in full])] if full else []) + \
            [tokens[s:s + n + 1][None] for s, n in zip(group, lengths) if n < window]
        for batch in batches:
            batch = batch.to(device)
            logits = logits_fn(batch[:, :-1])  # (B, T, V)
            nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1),
                                  reduction="sum")
            total += nll.item()
            count += batch[:, 1:].numel()
            bar.update(batch[:, 1:].numel())
    bar.close()
    return total, count


def document_bytes(tokens: np.ndarray, *, separator_id: int, decode: Callable[[list[int]], str]) -> int:
    """UTF-8 bytes of the documents in a token stream whose documents are separated by separator_id (eos), each
    decoded on its own (a tokenizer's decode of a whole document is exact; of an arbitrary slice it may not be)."""
    tokens = np.asarray(tokens)
    cuts = np.flatnonzero(tokens == separator_id)
    bounds = np.concatenate(([-1], cuts, [len(tokens)]))
    return sum(len(decode(tokens[a + 1:b].tolist()).encode("utf-8")) for a, b in zip(bounds[:-1], bounds[1:])
               if b > a + 1)


def score_token_stream(logits_fn: LogitsFn, tokens: np.ndarray, *, separator_id: int,
                       decode: Callable[[list[int]], str], window: int, batch_size: int = 8,
                       device: torch.device | str = "cpu", max_tokens: int | None = None,
                       progress: bool = False, desc: str = "score") -> TextScore:
    """TextScore of a stream of documents that each end with separator_id (a validation shard: every document
    ends with eos). A separator is put in front, as the training windows see one before every document but the
    first, so that every token of every document is predicted. With max_tokens the stream is cut after the last
    whole document within that budget, so that bytes and predicted tokens cover the same documents."""
    tokens = np.asarray(tokens)
    if max_tokens is not None and len(tokens) > max_tokens:
        cuts = np.flatnonzero(tokens[:max_tokens] == separator_id)
        tokens = tokens[:cuts[-1] + 1] if len(cuts) else tokens[:max_tokens]
    stream = np.concatenate(([separator_id], tokens))
    total, count = stream_nll(logits_fn, stream, window=window, batch_size=batch_size, device=device,
                              progress=progress, desc=desc)
    num_bytes = document_bytes(tokens, separator_id=separator_id, decode=decode)
    return TextScore(total_nll=total, num_tokens=count, num_bytes=num_bytes)


def score_texts(logits_fn: LogitsFn, texts: Iterable[str], *, encode: Callable[[str], list[int]], separator_id: int,
                window: int, batch_size: int = 8, device: torch.device | str = "cpu", progress: bool = False,
                desc: str = "score") -> TextScore:
    """TextScore of raw texts under any tokenizer: the stream [sep] doc1 [sep] doc2 [sep] ..., so that every
    document token and each document's closing separator is predicted, and the bytes are the texts' own."""
    stream, num_bytes = [separator_id], 0
    for text in texts:
        stream += [*encode(text), separator_id]
        num_bytes += len(text.encode("utf-8"))
    total, count = stream_nll(logits_fn, stream, window=window, batch_size=batch_size, device=device,
                              progress=progress, desc=desc)
    return TextScore(total_nll=total, num_tokens=count, num_bytes=num_bytes)


@torch.no_grad()
def last_word_accuracy(logits_fn: LogitsFn, examples: Iterable[tuple[list[int], list[int]]], *,
                       device: torch.device | str = "cpu", progress: bool = False) -> tuple[float, int]:
    """LAMBADA's measure (Paperno et al. 2016): the fraction of (context ids, last-word ids) examples whose every
    last-word token is the model's argmax given the context and the word's earlier tokens (greedy decoding of
    the word, as GPT-2's and lm-evaluation-harness's `is_greedy`). Returns (accuracy, number of examples)."""
    correct = total = 0
    for context, target in tqdm(list(examples), desc="lambada", disable=not progress, mininterval=1.0):
        idx = torch.tensor([context + target], device=device)
        logits = logits_fn(idx[:, :-1])[0, len(context) - 1:]  # (len(target), V)
        correct += bool((logits.argmax(-1) == idx[0, len(context):]).all())
        total += 1
    if total == 0:
        raise ValueError("no LAMBADA examples to score")
    return correct / total, total
