"""engine/evaluation/scoring.py against independent oracles: a bigram model scored by hand in numpy, uniform logits
(log2 V bits per token), transformers' own loss, and a last-word accuracy whose answer is built into the model."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from engine.evaluation.scoring import (TextScore, document_bytes, last_word_accuracy, model_logits_fn, score_texts,
                                       score_token_stream, stream_nll)

V = 11


class Bigram(nn.Module):
    """logits of the next token depend on the current token only: any windowing gives the same total."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.table = nn.Parameter(torch.randn(V, V, generator=torch.Generator().manual_seed(seed)))

    def forward(self, idx):
        return self.table[idx], None


def bigram_nll_numpy(table: np.ndarray, tokens: np.ndarray) -> float:
    log_probs = table - np.log(np.exp(table).sum(axis=1, keepdims=True))
    return float(-sum(log_probs[a, b] for a, b in zip(tokens[:-1], tokens[1:])))


@pytest.mark.parametrize("window, batch_size", [(1, 1), (4, 3), (7, 2), (64, 8), (100, 1)])
def test_stream_nll_predicts_every_token_once_whatever_the_window(window, batch_size):
    model = Bigram()
    tokens = np.random.default_rng(0).integers(0, V, 59)
    total, count = stream_nll(model_logits_fn(model), tokens, window=window, batch_size=batch_size)
    assert count == 58
    assert total == pytest.approx(bigram_nll_numpy(model.table.detach().double().numpy(), tokens), rel=1e-5)
    total, count = stream_nll(model_logits_fn(model), tokens, window=window, batch_size=batch_size, max_tokens=20)
    assert count == 20
    assert total == pytest.approx(bigram_nll_numpy(model.table.detach().double().numpy(), tokens[:21]), rel=1e-5)


def test_stream_nll_equals_transformers_loss():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config).eval()
    tokens = torch.randint(0, 50, (40,))
    with torch.no_grad():
        expected = model(tokens[None], labels=tokens[None]).loss.item() * 39  # HF's mean over 39 shifted tokens
        total, count = stream_nll(model_logits_fn(model), tokens, window=64)
    assert count == 39 and total == pytest.approx(expected, rel=1e-5)


def test_uniform_model_costs_log2_vocab_bits_per_token():
    texts = ["héllo world", "ab", "naïve café ☕"]
    encode = lambda text: [ord(c) % V for c in text]  # noqa: E731  (any tokenizer: bytes are the texts' own)
    uniform = lambda idx: torch.zeros(*idx.shape, V)  # noqa: E731
    score = score_texts(uniform, texts, encode=encode, separator_id=0, window=5)
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert score.num_bytes == num_bytes and score.num_tokens == sum(map(len, texts)) + len(texts)
    assert score.bits_per_byte == pytest.approx(score.num_tokens * math.log2(V) / num_bytes)
    assert score.perplexity == pytest.approx(V)


def test_token_stream_bytes_are_the_documents_and_max_tokens_cuts_at_a_document_end():
    alphabet = "xaé☕"  # 1, 1, 2 and 3 UTF-8 bytes
    decode = lambda ids: "".join(alphabet[i] for i in ids)  # noqa: E731
    shard = np.array([1, 2, 0, 3, 3, 1, 0, 2, 0])  # three documents, each ending with eos (0)
    assert document_bytes(shard, separator_id=0, decode=decode) == (1 + 2) + (3 + 3 + 1) + 2
    uniform = lambda idx: torch.zeros(*idx.shape, V)  # noqa: E731
    full = score_token_stream(uniform, shard, separator_id=0, decode=decode, window=4)
    assert full.num_tokens == len(shard) and full.num_bytes == 12  # an eos is prepended: every token predicted
    cut = score_token_stream(uniform, shard, separator_id=0, decode=decode, window=4, max_tokens=5)
    assert cut.num_tokens == 3 and cut.num_bytes == 3  # the second document would not fit whole


def test_last_word_accuracy_counts_greedy_hits():
    # The model always predicts token + 1: a target continuing the count is a hit, any other a miss.
    succ = lambda idx: torch.nn.functional.one_hot((idx + 1) % V, V).float()  # noqa: E731
    examples = [([1, 2], [3, 4]), ([5], [6]), ([1, 2], [3, 5]), ([7, 8], [2])]
    assert last_word_accuracy(succ, examples) == (0.5, 4)
    with pytest.raises(ValueError, match="no LAMBADA"):
        last_word_accuracy(succ, [])


def test_text_score_without_bytes():
    assert TextScore(total_nll=2.0, num_tokens=2, num_bytes=None).bits_per_byte is None
