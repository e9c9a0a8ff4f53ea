"""The user docs (docs/, mkdocs.yml) and the README: the site builds with no broken link, and the commands
and configs the quickstarts show are ones hpcnlp accepts. Reads only repo files, writes only tmp dirs."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)


def _blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(text)]


def _readme_quickstart() -> str:
    """The README's "Quickstart on your cluster" section, up to the next `## ` heading."""
    text = (REPO / "README.md").read_text()
    m = re.search(r"^## Quickstart on your cluster\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, "README.md has no '## Quickstart on your cluster' section"
    return m.group(1)


def _quickstart_texts() -> list[tuple[str, str]]:
    return [
        ("docs/quickstart.md", (REPO / "docs/quickstart.md").read_text()),
        ("README.md (Quickstart on your cluster)", _readme_quickstart()),
    ]


def _hpcnlp_lines(text: str) -> list[str]:
    return [
        line.strip()
        for lang, body in _blocks(text)
        if lang in ("", "bash", "sh", "console")
        for line in body.splitlines()
        if line.strip().startswith("hpcnlp ")
    ]


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is in requirements/docs.txt: run `make setup` (or `make docs`)")
    site = tmp_path / "site"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(REPO / "mkdocs.yml"),
            "--site-dir",
            str(site),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    warnings = [line for line in out.splitlines() if line.startswith("WARNING")]
    assert not [w for w in warnings if "link" in w or "anchor" in w], "\n".join(warnings)
    assert (site / "index.html").is_file() and (site / "architecture.html").is_file()
    assert list(site.glob("img/*.png")), "the images the pages show are copied into the site"


@pytest.mark.parametrize("source,text", _quickstart_texts(), ids=["docs-quickstart", "readme-quickstart"])
def test_quickstart_commands_exist(source, text, capsys):
    from hpcnlp.cli import build_parser, main

    lines = _hpcnlp_lines(text)
    assert lines, f"{source}: no `hpcnlp ...` line in its code blocks"
    for line in lines:
        argv = shlex.split(line, comments=True)[1:]
        sub = argv[0]
        with pytest.raises(SystemExit) as exit_:
            main([sub, "--help"])
        assert exit_.value.code == 0, f"{source}: `hpcnlp {sub} --help` exited {exit_.value.code}"
        # The whole line parses too (options such as --dry-run, --watch exist); parsing runs nothing.
        try:
            build_parser().parse_args(argv)
        except SystemExit as e:  # argparse's way of refusing
            pytest.fail(f"{source}: `{line}` is refused by hpcnlp's parser (exit {e.code}): {capsys.readouterr().err}")
        for flag in ("--config", "-c"):
            if flag in argv:
                config = argv[argv.index(flag) + 1]
                assert (REPO / config).is_file(), f"{source}: `{line}` names {config}, which is not in the repo"


def _load_profile():
    try:
        from hpcnlp.cluster import load_profile
    except ImportError:
        from hpcnlp.cluster.profile import load_profile
    return load_profile


@pytest.mark.parametrize("source,text", _quickstart_texts(), ids=["docs-quickstart", "readme-quickstart"])
def test_quickstart_yaml_blocks_validate(source, text, tmp_path):
    from hpcnlp.config import ConfigError
    from hpcnlp.jobs import load_config

    checked = 0
    for i, (lang, body) in enumerate(_blocks(text)):
        if lang not in ("yaml", "yml"):
            continue
        raw = yaml.safe_load(body)
        assert isinstance(raw, dict), f"{source}: yaml block {i} is not a mapping"
        path = tmp_path / f"block-{i}.yaml"
        path.write_text(body)
        try:
            if "job" in raw:  # a job config: the shape checks of `hpcnlp check` (no file checks)
                load_config(path, check=False)
            elif "stages" in raw:  # a pipeline: not checked here
                continue
            else:  # the cluster profile
                _load_profile()(path)
        except ConfigError as e:
            # The image path is the site's (a shared dir of its cluster), not this machine's
            lines = [
                line for p, line in zip(e.problems, e.lines) if not (p.key == "image" and "not a file" in p.message)
            ]
            if lines:
                pytest.fail(f"{source}: yaml block {i} is refused:\n" + "\n".join(lines))
        checked += 1
    if source == "docs/quickstart.md":
        assert checked, "docs/quickstart.md shows the cluster profile as a yaml block"


def test_readme_is_short_and_points_at_the_docs():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for must in ("make demo", "make test", "make test-fast"):
        assert must in text
    links = re.findall(r"\]\((docs/[^)#\s]+)", text)
    assert links, "README.md maps docs/"
    for link in links:
        assert (REPO / link).is_file(), f"README.md links {link}, which does not exist"
    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]
    pages = set(re.findall(r"[\w/]+\.md", str(nav)))
    assert {p for p in pages} <= {link.removeprefix("docs/") for link in links}, "every page is in the README's map"
