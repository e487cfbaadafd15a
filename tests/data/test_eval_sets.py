"""data/corpora/eval_sets.py: WikiText rows joined into articles, LAMBADA's last word, the local store, offline fetching."""
from __future__ import annotations

import pytest

from data.errors import DataError
from data.corpora.eval_sets import (eval_set_path, fetch_eval_set, lambada_split, read_eval_set, wikitext_articles,
                                    write_eval_set)


def test_wikitext_rows_become_articles_at_top_level_headings():
    rows = ["", " = Robert Boulter = \n", "", " Robert Boulter is an actor . \n", " = = Career = = \n",
            " He played ... \n", " = Du Fu = \n", " Du Fu was a poet . \n"]
    articles = wikitext_articles(rows)
    assert len(articles) == 2  # '= = Career = =' is a section, not a new article
    assert articles[0].startswith("= Robert Boulter =") and "= = Career = =" in articles[0]
    assert articles[1] == "= Du Fu = \n Du Fu was a poet ."


def test_lambada_target_is_the_last_word():
    assert lambada_split("he opened the door and saw his dog") == ("he opened the door and saw his", " dog")
    with pytest.raises(DataError, match="without a context"):
        lambada_split("alone")


def test_store_round_trip_without_partial_files(tmp_path):
    texts = ["first\nline", "second ☕", "third"]
    path = write_eval_set("lambada_test", texts, tmp_path)
    assert path == eval_set_path(tmp_path, "lambada_test") and not list(path.parent.glob(".*.tmp"))
    assert read_eval_set("lambada_test", tmp_path) == texts
    assert read_eval_set("lambada_test", tmp_path, max_documents=2) == texts[:2]
    assert read_eval_set("wikitext103_test", tmp_path) is None


def test_fetch_offline_or_unknown_is_a_data_error(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="unknown evaluation set"):
        fetch_eval_set("nope", tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="could not fetch lambada_test"):
        fetch_eval_set("lambada_test", tmp_path)
    assert not eval_set_path(tmp_path, "lambada_test").exists()
