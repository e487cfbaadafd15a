"""Catalog entries, the recommendation rule, and the mixture's position-based assignment."""
from __future__ import annotations

import numpy as np
import pytest

from data.corpora.catalog import CATALOG, MIXTURES, format_recommendation, parse_model_size, recommend
from data.errors import DataError
from data.mixture import MixtureSampler


def test_catalog_covers_the_asked_families_with_real_hub_ids():
    hub_ids = {entry.hub_id for entry in CATALOG.values()}
    for required in ("Salesforce/wikitext", "roneneldan/TinyStories", "Skylion007/openwebtext", "allenai/c4",
                     "HuggingFaceFW/fineweb", "HuggingFaceFW/fineweb-edu", "open-web-math/open-web-math"):
        assert required in hub_ids
    assert {"en", "zh", "code"} <= {entry.language for entry in CATALOG.values()}
    for entry in CATALOG.values():
        assert entry.num_tokens > 0 and entry.num_bytes >= entry.num_tokens  # >= 1 byte per token
        assert entry.license and entry.purpose
        assert entry.hub_id.count("/") == 1 or entry.name == "shakespeare"
    for weights in MIXTURES.values():
        assert set(weights) <= set(CATALOG) and sum(weights.values()) == pytest.approx(1.0)


@pytest.mark.parametrize(("size", "params"), [("1B", 1e9), ("7b", 7e9), ("125M", 125e6), ("1.3e9", 1.3e9)])
def test_recommendation_is_20_tokens_per_parameter(size, params):
    assert parse_model_size(size) == params
    for lang in MIXTURES:
        sources = recommend(parse_model_size(size), lang=lang)
        assert sum(s.num_tokens for s in sources) == pytest.approx(20 * params)  # Chinchilla, arXiv:2203.15556
        assert sum(s.weight for s in sources) == pytest.approx(1.0)
    lines = format_recommendation(params, recommend(params, lang="zh"), tokens_per_param=20)
    assert any("--download chinese-fineweb-edu" in line for line in lines)
    assert any("train_tokenizer.py" in line for line in lines)


def test_bad_sizes_and_languages_are_data_errors():
    for bad in ("1X", "-5B", ""):
        with pytest.raises(DataError):
            parse_model_size(bad)
    with pytest.raises(DataError, match="--lang"):
        recommend(1e9, lang="fr")


@pytest.mark.parametrize("weights", [[0.7, 0.3], [1, 1, 2], [0.05, 0.95], [1.0, 0.0]])
def test_every_prefix_of_the_run_follows_the_weights(weights):
    sampler = MixtureSampler(weights, [f"s{i}" for i in range(len(weights))])
    sources, local = sampler.assign(np.zeros(len(weights), dtype=np.int64), 2000)
    share = np.asarray(weights) / np.sum(weights)
    counts = np.zeros(len(weights))
    for n, source in enumerate(sources, start=1):
        assert local[n - 1] == counts[source]  # each source is read at its own next position
        counts[source] += 1
        assert np.all(np.abs(counts - share * n) <= 1.0)


def test_assignment_depends_only_on_counts_so_resume_continues_exactly():
    sampler = MixtureSampler([0.6, 0.3, 0.1], ["a", "b", "c"])
    whole, whole_local = sampler.assign(np.zeros(3, dtype=np.int64), 300)
    counts = sampler.counts_after(137)
    assert counts.tolist() == np.bincount(whole[:137], minlength=3).tolist()
    rest, rest_local = sampler.assign(counts, 163)
    assert rest.tolist() == whole[137:].tolist() and rest_local.tolist() == whole_local[137:].tolist()


@pytest.mark.parametrize(("weights", "message"), [([-1, 2], "negative"), ([0, 0], "all zero")])
def test_bad_weights(weights, message):
    with pytest.raises(DataError, match=message):
        MixtureSampler(weights, ["a", "b"])
