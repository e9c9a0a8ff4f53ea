"""Token-classification (NER) data: CoNLL files or JSONL with `tokens` and `tags`, BIO/IOB2 tags.

CoNLL: one token and its tag per line (tab or spaces; the tag is the last field), a blank line
between sentences, `-DOCSTART-` lines skipped. Words are aligned to sub-word tokens with the fast
tokenizer's word_ids(): a word's first sub-token carries its tag; later sub-tokens carry -100 (no
loss) or, with label_all_tokens, the I- form of the tag. Evaluation sets always label first
sub-tokens only, so scores count words, never sub-tokens.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

from hpcnlp.config import FinetuneDataConfig, Problem
from hpcnlp.data.labels import IGNORE, DataError, Labelled, decoded_lines, detect_format, length_sorted, read_splits

log = logging.getLogger(__name__)
TAG = re.compile(r"^(O|[BI]-.+)$")


@dataclass
class Sentence:
    where: str  # "line N" of its first token
    tokens: list[str]
    tags: list[str]
    first_line: int = 0  # CoNLL: token i is on line first_line + i (for error messages)

    def token_where(self, i: int) -> str:
        return f"line {self.first_line + i}" if self.first_line else f"{self.where}, token {i + 1}"


def read_conll(path: str, encoding: str = "utf-8") -> list[Sentence]:
    sentences, problems = [], []
    tokens, tags, start = [], [], 0

    def flush():
        nonlocal tokens, tags
        if tokens:
            sentences.append(Sentence(f"line {start}", tokens, tags, start))
        tokens, tags = [], []

    for n, line in enumerate(decoded_lines(path, encoding), 1):
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            flush()
            continue
        if len(fields) < 2:
            problems.append(
                Problem(
                    key=f"line {n}",
                    message=f"token without a tag: {line.strip()!r}",
                    fix="write 'token<TAB>tag' (tag O outside entities)",
                )
            )
            continue
        if not tokens:
            start = n
        tokens.append(fields[0])
        tags.append(fields[-1])
    flush()
    if problems:
        raise DataError(path, problems)
    return sentences


def read_jsonl(path: str, data: FinetuneDataConfig) -> list[Sentence]:
    sentences, problems = [], []
    tok_col, tag_col = data.tokens_column, data.tags_column
    for n, line in enumerate(decoded_lines(path, data.encoding), 1):
        if not line.strip():
            continue
        where = f"line {n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(Problem(key=where, message=f"not valid JSON ({e})", fix="one JSON object per line"))
            continue
        tokens, tags = record.get(tok_col), record.get(tag_col)
        if not isinstance(tokens, list) or not isinstance(tags, list):
            problems.append(
                Problem(
                    key=where,
                    message=f"needs lists '{tok_col}' and '{tag_col}' (has {sorted(record)})",
                    fix="set data.tokens_column / data.tags_column",
                )
            )
        elif not tokens:
            problems.append(Problem(key=where, message="empty sentence (no tokens)", fix="remove the line"))
        elif len(tokens) != len(tags):
            problems.append(
                Problem(
                    key=where,
                    message=f"{len(tokens)} tokens but {len(tags)} tags",
                    fix="give exactly one tag per token",
                )
            )
        else:
            names = data.label_names
            if all(isinstance(t, int) for t in tags) and names:  # tag ids, as HF datasets store them
                tags = [names[t] if 0 <= t < len(names) else str(t) for t in tags]
            sentences.append(Sentence(where, [str(t) for t in tokens], [str(t) for t in tags]))
    if problems:
        raise DataError(path, problems)
    return sentences


def i_after_o(sentence: Sentence) -> list[int]:
    """Positions of I-X tags that start an entity (after O, at the start, or after another type):
    valid IOB1, invalid IOB2."""
    out, prev = [], "O"
    for i, tag in enumerate(sentence.tags):
        if tag.startswith("I-") and prev[2:] != tag[2:]:
            out.append(i)
        prev = tag
    return out


def read_sentences(path: str, data: FinetuneDataConfig) -> list[Sentence]:
    """Read and check one file: tags are O/B-X/I-X; I- after O is counted (an error in strict_iob2)."""
    fmt = detect_format(path, data.format)
    sentences = read_conll(path, data.encoding) if fmt == "conll" else read_jsonl(path, data)
    if not sentences:
        raise DataError(path, [Problem(key="<file>", message="no sentences", fix="point it at a file with data")])
    bad = [
        Problem(key=s.token_where(i), message=f"tag {tag!r} is not O, B-TYPE or I-TYPE", fix="use BIO/IOB2 tags")
        for s in sentences
        for i, tag in enumerate(s.tags)
        if not TAG.match(tag)
    ]
    if bad:
        raise DataError(path, bad)
    starts = [(s, i) for s in sentences for i in i_after_o(s)]
    if starts and data.strict_iob2:
        raise DataError(
            path,
            [
                Problem(
                    key=s.token_where(i),
                    message=f"{s.tags[i]} follows {s.tags[i - 1] if i else 'the sentence start'} (not IOB2)",
                    fix=f"tag it B-{s.tags[i][2:]}, or set data.strict_iob2: false",
                )
                for s, i in starts
            ],
            total=len(starts),
        )
    if starts:
        log.warning(
            "%s: %d I- tags start an entity (after O or another type; first at %s); "
            "scored as entity starts (set data.strict_iob2: true to refuse them)",
            path,
            len(starts),
            starts[0][0].token_where(starts[0][1]),
        )
    return sentences


def complete_label_set(tags) -> list[str]:
    """O first, then per type B- and I- (both, so label_all_tokens always has an I- form)."""
    types = sorted({t[2:] for t in tags if t != "O"})
    return ["O"] + [f"{p}-{t}" for t in types for p in "BI"]


def i_form(label_names: list[str]) -> list[int]:
    """id -> id of its I- form (B-X -> I-X; I-X and O map to themselves)."""
    ids = {n: i for i, n in enumerate(label_names)}
    return [ids.get("I-" + n[2:], i) if n.startswith("B-") else i for i, n in enumerate(label_names)]


def align_labels(
    word_ids: list[int | None], word_label_ids: list[int], label_all_tokens: bool, to_i_form: list[int]
) -> list[int]:
    """Word labels -> one label per sub-token (special tokens get -100)."""
    labels, prev = [], None
    for w in word_ids:
        if w is None:
            labels.append(IGNORE)
        elif w != prev:
            labels.append(word_label_ids[w])
        else:
            labels.append(to_i_form[word_label_ids[w]] if label_all_tokens else IGNORE)
        prev = w
    return labels


def load(data: FinetuneDataConfig, tokenizer) -> Labelled:
    from datasets import Dataset

    examples, files, label_names = read_splits(
        data, lambda p: read_sentences(p, data), lambda s: s.tags, complete_label_set
    )
    label2id, to_i = {n: i for i, n in enumerate(label_names)}, i_form(label_names)
    stats = {}

    def tokenize(batch, all_tokens: bool):
        enc = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=data.max_seq_length)
        enc["labels"], enc["word_ids"] = [], []
        for i, tags in enumerate(batch["tags"]):
            word_ids = enc.word_ids(i)
            enc["labels"].append(align_labels(word_ids, [label2id[t] for t in tags], all_tokens, to_i))
            enc["word_ids"].append([-1 if w is None else w for w in word_ids])
        return enc

    splits = {}
    for name, sents in examples.items():
        train = name == "train"
        ds = Dataset.from_dict(
            {"where": [s.where for s in sents], "tokens": [s.tokens for s in sents], "tags": [s.tags for s in sents]}
        )
        ds = ds.map(tokenize, batched=True, fn_kwargs={"all_tokens": data.label_all_tokens and train})
        # Words with no sub-token left (truncated, or dropped by the tokenizer) get no prediction.
        lost = sum(len(set(w) - {-1}) < len(t) for w, t in zip(ds["word_ids"], ds["tags"]))
        stats[name] = {
            "file": files[name],
            "sentences": len(sents),
            "words": sum(len(s.tokens) for s in sents),
            "sentences_with_unscored_words": lost,
            "i_after_o": sum(len(i_after_o(s)) for s in sents),
        }
        splits[name] = ds if train else length_sorted(ds)
    return Labelled(splits, label_names, files, stats)
