"""Domain text for continued pretraining never carries held-out sentences (data/fetch_finetune.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("fetch_finetune", REPO / "data" / "fetch_finetune.py")
fetch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fetch)


def test_tweets_equal_to_a_held_out_sentence_are_dropped_and_duplicates_kept_once():
    held_out = [[("@user", "O"), ("Going", "O"), ("to", "O"), ("Paris", "B-geo-loc"), ("!", "O")]]
    tweets = ["@User going to PARIS!!", "Going to  Rome today", "going to rome today", "Paris is nice"]
    kept, dropped = fetch.tweets_domain(tweets, held_out)
    assert dropped == 1 and kept == ["Going to Rome today", "Paris is nice"]


def test_rotten_domain_keeps_training_snippets_and_plots_of_training_side_movies():
    import bz2
    import io

    raw = pd.DataFrame(
        {
            "category": ["fresh", "plot", "plot", "plot"],
            "movie_name": ["a", "a", "b", "c"],
            "text": ["good film", "A plot of a.", "A plot of b.", "A plot\nof c."],
            "has_plot_and_reviews": [True, True, True, False],
        }
    )
    buf = io.BytesIO()
    raw.to_csv(buf, index=False)
    splits = {
        "train": pd.DataFrame({"text": ["good film"], "movie": ["a"]}),
        "validation": pd.DataFrame({"text": ["x"], "movie": ["b"]}),
        "test": pd.DataFrame({"text": [], "movie": []}),
    }
    assert fetch.rotten_domain(bz2.compress(buf.getvalue()), splits) == ["good film", "A plot of a.", "A plot of c."]
