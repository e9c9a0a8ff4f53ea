"""Property-based tests (Hypothesis, seeded, bounded): whatever bytes a user's file or command line holds,
the config loader, the data readers and the bundle verifier end in a result or in one-line refusals
(exit 2, or exit 1 for verify), never a traceback or a hang."""

from __future__ import annotations

import json

import pytest
from helpers import cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpcnlp.config import ConfigError

# derandomize: the same examples on every run (a failure reproduces); deadline: a hang fails the example.
FUZZ = settings(
    max_examples=60,
    derandomize=True,
    deadline=10_000,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

yaml_ish = st.one_of(
    st.text(max_size=300),
    st.lists(
        st.tuples(
            st.sampled_from(["job", "output_dir", "training", "data", "max_requeues", "resume", "&a", "<<", "-"]),
            st.sampled_from([": ", ":", " ", ": &x ", ": *x ", ": [", ": {", ": !!python/object ", "\n  - "]),
            st.text(alphabet=st.characters(codec="utf-8"), max_size=20),
        ),
        max_size=12,
    ).map(lambda rows: "\n".join(k + s + v for k, s, v in rows)),
)
overrides = st.lists(
    st.one_of(st.text(max_size=30), st.from_regex(r"[a-z_.]{1,20}=[\[\]{}a-z0-9,.&*:'\" -]{0,20}", fullmatch=True)),
    max_size=3,
)


@FUZZ
@given(text=yaml_ish, extra=overrides)
def test_any_config_file_and_overrides_end_in_ok_or_one_line_refusals(tmp_path_factory, text, extra):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    res = cli("check", "--config", str(path), *extra)
    assert res.returncode in (0, 2), res.stderr
    if res.returncode == 2:
        lines = res.stderr.strip().splitlines()
        assert lines and all(line.startswith(("error:", "usage:", "hpcnlp")) for line in lines), res.stderr


CELL = st.text(alphabet=st.sampled_from(list("ab ,;\t\"'\n\r1x\u00e9\\")), max_size=12)


def _read(tmp_path_factory, name: str, body: bytes, **data):
    from hpcnlp.config import FinetuneDataConfig
    from hpcnlp.data import classification, ner

    path = tmp_path_factory.mktemp("fuzz") / name
    path.write_bytes(body)
    reader = ner if name.endswith((".conll", ".txt")) or "tokens" in data else classification
    try:
        out = reader.load(FinetuneDataConfig(train_file=str(path), max_seq_length=16, **data), _tokenizer())
    except ConfigError as e:  # a data error: one line per problem, naming the file
        assert e.lines and all(str(path) in line or "data." in line for line in e.lines), e.lines
        return None
    return out


_TOK = {}


@pytest.fixture(scope="module", autouse=True)
def _tokenizer_loaded():
    """Loaded before the first example, with the job registry: their seconds (more on a busy machine) are
    not any example's deadline."""
    from hpcnlp.jobs import registry

    registry()
    _tokenizer()


def _tokenizer():
    if "t" not in _TOK:
        from hpcnlp.models import load_tokenizer

        _TOK["t"] = load_tokenizer("minilm-l6")
    return _TOK["t"]


@FUZZ
@given(rows=st.lists(st.tuples(CELL, CELL), max_size=12), sep=st.sampled_from([",", "\t"]))
def test_any_csv_or_tsv_is_read_or_refused(tmp_path_factory, rows, sep):
    body = ("text" + sep + "label\n" + "".join(a + sep + b + "\n" for a, b in rows)).encode()
    out = _read(tmp_path_factory, "d.csv" if sep == "," else "d.tsv", body)
    if out is not None:  # read as written: one row per non-blank line, never a row swallowed by a quote
        lines = [line for line in body.decode().split("\n")[1:] if line.strip("\r")]
        assert sum(len(ds) for ds in out.splits.values()) == len(lines)


@FUZZ
@given(
    rows=st.lists(st.tuples(CELL, CELL), min_size=2, max_size=12),
    at=st.integers(0, 11),
    sep=st.sampled_from([",", "\t"]),
)
def test_a_quote_left_open_is_refused_naming_its_line(tmp_path_factory, rows, at, sep):
    rows = [(a.replace('"', "").replace("\n", "").replace("\r", "") or "x", "a") for a, _ in rows]
    at %= len(rows)
    rows[at] = ('"' + rows[at][0], "a")
    body = ("text" + sep + "label\n" + "".join(a + sep + b + "\n" for a, b in rows)).encode()
    path = tmp_path_factory.mktemp("fuzz") / ("d.csv" if sep == "," else "d.tsv")
    path.write_bytes(body)
    res = cli("check", "--config", str(_finetune_config(path)))
    assert res.returncode == 2 and f"{path}' line {at + 2}: " in res.stderr, res.stderr


def _finetune_config(path):
    config = path.with_name("c.yaml")
    config.write_text(
        json.dumps(
            {
                "job": "finetune",
                "task": "sequence-classification",
                "output_dir": str(path.with_name("out")),
                "data": {"train_file": str(path)},
            }
        )
    )
    return config


@FUZZ
@given(
    lines=st.lists(
        st.one_of(
            st.text(max_size=40),
            st.dictionaries(
                st.sampled_from(["text", "label", "tokens", "tags", "x"]),
                st.one_of(
                    st.none(),
                    st.booleans(),
                    st.integers(),
                    st.floats(),
                    st.text(max_size=8),
                    st.lists(st.text(max_size=4)),
                ),
                max_size=4,
            ).map(json.dumps),
        ),
        max_size=10,
    )
)
def test_any_jsonl_is_read_or_refused(tmp_path_factory, lines):
    body = "\n".join(lines).encode("utf-8", "surrogateescape")
    _read(tmp_path_factory, "d.jsonl", body)


@FUZZ
@given(
    lines=st.lists(
        st.one_of(
            st.just(""),
            st.tuples(
                st.text(alphabet="abé@#", min_size=1, max_size=6), st.sampled_from(["O", "B-x", "I-x", "B-", "?", ""])
            ).map("\t".join),
            st.text(max_size=20),
        ),
        max_size=20,
    )
)
def test_any_conll_is_read_or_refused(tmp_path_factory, lines):
    _read(tmp_path_factory, "d.conll", "\n".join(lines).encode("utf-8", "surrogateescape"))


@FUZZ
@given(
    manifest=st.one_of(
        st.binary(max_size=60),
        st.recursive(
            st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10)),
            lambda inner: st.one_of(
                st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=10), inner, max_size=3)
            ),
            max_leaves=12,
        ).map(lambda v: json.dumps({"files": v, "passed": True}).encode()),
        st.dictionaries(
            st.sampled_from(
                ["model.onnx", "x/../y", "../escape", "manifest.json", "a\udc80", "\ud800x", "a" * 300, ""]
            ),
            st.fixed_dictionaries(
                {}, optional={"bytes": st.one_of(st.integers(), st.text(max_size=3)), "sha256": st.text(max_size=5)}
            ),
            max_size=3,
        ).map(lambda files: json.dumps({"files": files, "passed": True}).encode("utf-8", "surrogatepass")),
    )
)
def test_any_manifest_is_verified_or_refused(tmp_path_factory, manifest):
    bundle = tmp_path_factory.mktemp("bundle")
    (bundle / "manifest.json").write_bytes(manifest)
    (bundle / "model.onnx").write_bytes(b"not onnx")
    res = cli("verify", str(bundle))
    assert res.returncode == 1, res.stdout
    lines = res.stderr.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), res.stderr
