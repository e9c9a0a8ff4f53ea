"""Build the technical-domain task from the Linux kernel's documentation (`make data`).

    python data/fetch_kernel_docs.py     # -> data/full/kernel-docs/

Source: Debian's linux-source-6.1 (`apt-get download`, GPL-2.0), its Documentation/ tree only; the
package version is recorded in stats.json (Debian serves the newest 6.1 point release, so rebuild and
compare stats.json before comparing figures across machines).

The task (sequence classification, English technical prose): a paragraph of Documentation/*.rst ->
the subsystem area it documents, i.e. its top-level directory. Twelve topical areas are kept
(AREAS); the cross-cutting books (admin-guide, driver-api, userspace-api, process, ...) and the
translations are left out as labels because their paragraphs belong to many subsystems at once.
A paragraph is a blank-line separated block of >= 20 words of prose: no indented block (code,
literal, list body), no directive, table or heading, >= 70% letters; exact repeats dropped; at most
MAX_PER_FILE paragraphs of one file (a seeded sample), so that one long file (virt/kvm/api.rst has
~570) cannot make up an area or a split.

Splits are by file (no file contributes to two splits), per area with a fixed seed: files in a
shuffled order fill test to 15% of the area's paragraphs, then validation to 15%, the rest train.
Label budgets: train-low.jsonl (LOW_BUDGET paragraphs, stratified from train) and train.jsonl (all).

Domain text for continued pretraining: domain/ holds every Documentation .rst file (all areas, the
books included, translations not) EXCEPT the files the validation and test paragraphs came from;
domain-eval/ holds those held-out files, for the MLM perplexity before/after on unseen domain text.
"""

from __future__ import annotations

import collections
import glob
import io
import json
import random
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "full" / "kernel-docs"
SEED = 42
AREAS = (
    "networking",
    "filesystems",
    "hwmon",
    "virt",
    "sound",
    "trace",
    "mm",
    "input",
    "power",
    "gpu",
    "scsi",
    "bpf",
)
HELD_OUT_SHARE = {"test": 0.15, "validation": 0.15}
LOW_BUDGET = 800
MIN_WORDS = 20
MAX_PER_FILE = 40
MARKUP_START = ("..", "::", "|", "+", "=", "-", "*", "#", ":")
UNDERLINE = re.compile(r"^[=\-~^\"'`#*+]{3,}$")


def documentation(workdir: Path) -> tuple[Path, str]:
    """Documentation/ of linux-source-6.1 unpacked under workdir, and the package's version."""
    subprocess.run(["apt-get", "download", "linux-source-6.1"], cwd=workdir, check=True)
    deb = sorted(glob.glob(str(workdir / "linux-source-6.1_*.deb")))[-1]
    version = Path(deb).name.split("_")[1]
    tar_xz = subprocess.run(
        ["dpkg-deb", "--fsys-tarfile", deb], check=True, capture_output=True
    ).stdout  # the .deb's data: one member, the source tarball
    with tarfile.open(fileobj=io.BytesIO(tar_xz)) as outer:
        inner = outer.extractfile("./usr/src/linux-source-6.1.tar.xz")
        with tarfile.open(fileobj=inner, mode="r:xz") as src:
            members = [m for m in src.getmembers() if m.name.startswith("linux-source-6.1/Documentation/")]
            src.extractall(workdir, members=members, filter="data")
    return workdir / "linux-source-6.1" / "Documentation", version


def paragraphs(text: str) -> list[str]:
    """The prose paragraphs of one .rst file (see the module docstring for what counts)."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if not lines or any(line.startswith((" ", "\t")) for line in lines):
            continue
        if UNDERLINE.match(lines[-1].strip()) or (len(lines) > 1 and UNDERLINE.match(lines[0].strip())):
            continue
        joined = " ".join(line.strip() for line in lines)
        if joined.startswith(MARKUP_START) or len(joined.split()) < MIN_WORDS:
            continue
        if sum(c.isalpha() for c in joined) < 0.7 * len(joined):
            continue
        out.append(joined)
    return out


def split_files(files: dict[str, list[str]], rng: random.Random) -> dict[str, str]:
    """file -> split, one area's files: shuffled, then test and validation filled to their share."""
    order = sorted(files)
    rng.shuffle(order)
    total = sum(len(files[f]) for f in order)
    split_of, filled, targets = {}, 0, []
    bound = 0.0
    for name, share in HELD_OUT_SHARE.items():
        bound += share
        targets.append((name, bound * total))
    for f in order:
        name = next((n for n, limit in targets if filled < limit), "train")
        split_of[f] = name
        filled += len(files[f])
    return split_of


def stratified_sample(rows: list[dict], n: int, rng: random.Random) -> list[dict]:
    """n rows with the labels in their proportions in rows (rounded), order shuffled."""
    by_label = collections.defaultdict(list)
    for r in rows:
        by_label[r["label"]].append(r)
    out = []
    for label in sorted(by_label):
        group = by_label[label]
        out += rng.sample(group, max(1, round(n * len(group) / len(rows))))
    rng.shuffle(out)
    return out


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in rows), "utf-8")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        stats = build(*documentation(Path(tmp)), OUT)
    print(json.dumps(stats, indent=2))


def build(docs: Path, version: str, out: Path) -> dict:
    """The task, the domain text and stats.json from a Documentation/ tree, into out (replaced whole)."""
    rng = random.Random(SEED)
    rst = sorted(p for p in docs.rglob("*.rst") if p.relative_to(docs).parts[0] != "translations")
    seen: set[str] = set()
    by_area: dict[str, dict[str, list[str]]] = collections.defaultdict(dict)
    for p in rst:
        rel = p.relative_to(docs)
        if len(rel.parts) < 2 or rel.parts[0] not in AREAS:
            continue
        kept = [t for t in paragraphs(p.read_text("utf-8", errors="replace")) if not (t in seen or seen.add(t))]
        if len(kept) > MAX_PER_FILE:
            kept = rng.sample(kept, MAX_PER_FILE)
        if kept:
            by_area[rel.parts[0]][str(rel)] = kept
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    held_out_files = set()
    for area in AREAS:
        for f, name in split_files(by_area[area], rng).items():
            splits[name] += [{"text": t, "label": area, "file": f} for t in by_area[area][f]]
            if name != "train":
                held_out_files.add(f)
    if out.exists():
        shutil.rmtree(out)  # data/full/kernel-docs is this script's own output, rebuilt whole
    out.mkdir(parents=True)
    for name, rows in splits.items():
        rng.shuffle(rows)
        write_jsonl(rows, out / f"{name}.jsonl")
    low = stratified_sample(splits["train"], LOW_BUDGET, rng)
    write_jsonl(low, out / "train-low.jsonl")
    domain_files = held_files = 0
    for p in rst:
        rel = str(p.relative_to(docs))
        dest = out / ("domain-eval" if rel in held_out_files else "domain") / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dest)
        held_files += rel in held_out_files
        domain_files += rel not in held_out_files
    stats = {
        "source": f"linux-source-6.1 {version} (Debian), Documentation/",
        "areas": list(AREAS),
        "seed": SEED,
        "paragraphs": {name: len(rows) for name, rows in splits.items()} | {"train-low": len(low)},
        "files": {name: len({r["file"] for r in rows}) for name, rows in splits.items()},
        "class_balance": {
            name: dict(sorted(collections.Counter(r["label"] for r in rows).items()))
            for name, rows in [*splits.items(), ("train-low", low)]
        },
        "majority_baseline_test_accuracy": max(collections.Counter(r["label"] for r in splits["test"]).values())
        / len(splits["test"]),
        "domain_files": domain_files,
        "domain_eval_files": held_files,
        "domain_mb": round(sum(f.stat().st_size for f in (out / "domain").rglob("*.rst")) / 2**20, 1),
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", "utf-8")
    return stats


if __name__ == "__main__":
    main()
