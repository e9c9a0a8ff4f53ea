"""MLM masking: whole-word masking keeps words whole; masks depend on (seed, batch) only."""

from __future__ import annotations

import torch

from hpcnlp.config import CorpusConfig
from hpcnlp.data.pack import prepare
from hpcnlp.train.mlm import MLMCollator


def _blocks(tmp_path, small_corpus, tok, with_offsets):
    cfg = CorpusConfig(
        train_files=[str(small_corpus / "*.rst.txt")], max_seq_length=64, prepared_root=str(tmp_path / "prepared")
    )
    train = prepare(cfg, tok, with_offsets=with_offsets).load()["train"]
    return [train[i] for i in range(16)]


def test_whole_word_masking_masks_every_piece_of_a_word(tmp_path, small_corpus, minilm_tokenizer):
    rows = _blocks(tmp_path, small_corpus, minilm_tokenizer, with_offsets=True)
    batch = MLMCollator(minilm_tokenizer, 0.3, whole_word_mask=True, seed=1)(rows)
    checked = 0
    for row, labels in zip(rows, batch["labels"]):
        word, words = -1, []  # word index per token, from offsets: a piece continues a word if it abuts it
        prev_end, prev_special = None, True
        for (start, end), special in zip(row["offset_mapping"], row["special_tokens_mask"]):
            if special:
                words.append(None)
            else:
                if prev_special or start != prev_end:
                    word += 1
                words.append(word)
            prev_end, prev_special = end, bool(special)
        masked_by_word: dict[int, set[bool]] = {}
        for w, lab in zip(words, labels[: len(words)].tolist()):
            if w is not None:
                masked_by_word.setdefault(w, set()).add(lab != -100)
        multi = [w for w in masked_by_word if words.count(w) > 1 and True in masked_by_word[w]]
        checked += len(multi)
        assert all(len(v) == 1 for v in masked_by_word.values()), "a word was masked only in part"
    assert checked > 0  # the sample did contain masked multi-piece words


def test_masks_are_a_function_of_seed_and_batch(tmp_path, small_corpus, minilm_tokenizer):
    rows = _blocks(tmp_path, small_corpus, minilm_tokenizer, with_offsets=False)
    torch.manual_seed(0)
    a = MLMCollator(minilm_tokenizer, 0.15, False, seed=3)(rows)
    torch.manual_seed(123)  # the global RNG does not matter
    b = MLMCollator(minilm_tokenizer, 0.15, False, seed=3)(rows)
    c = MLMCollator(minilm_tokenizer, 0.15, False, seed=4)(rows)
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(a["labels"], c["labels"])
    frac = (a["labels"] != -100).float().mean().item()
    assert 0.08 < frac < 0.22
