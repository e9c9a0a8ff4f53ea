"""The shipped bundle: what deployment teams receive, its manifest, and `hpcnlp verify`.

<root>/<name>/<version>/
  model.onnx, model.int8.onnx   the models (fp32, int8 when made)
  config.json                   id2label / label2id; tokenizer.json + tokenizer_config.json + vocab ...
  onnx_inference.py             inference with onnxruntime + tokenizers only (examples/onnx_inference.py)
  MODEL_CARD.md, validation.md, validation.json, latency.png
  manifest.json                 sha256 and size of every other file, versions, provenance, gate results

A bundle is built in a staging dir beside its destination and renamed into place in one step
(`publish`), so a half-built bundle never sits where shipped ones go.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from hpcnlp.runtime import env
from hpcnlp.runtime.io import atomic_write_json

MANIFEST = "manifest.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
PACKAGES = ("hpcnlp", "torch", "transformers", "tokenizers", "optimum", "optimum-onnx", "onnx", "onnxruntime")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "onnx_inference.py"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dir_sha256(path: str | Path) -> str:
    """One hash for a model dir: its top-level files' names and contents (checkpoints are not the model)."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).iterdir() if p.is_file()):
        h.update(f.name.encode() + b"\0" + sha256(f).encode() + b"\n")
    return h.hexdigest()


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    """HEAD of the repo the code runs from, '+dirty' with uncommitted changes; None outside git."""
    repo = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def stage(onnx_dir: Path, root: Path) -> Path:
    """A staging dir (hidden, beside the destinations) holding the files to validate and ship."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
    for name in ("model.onnx", "model.int8.onnx", "config.json", *TOKENIZER_FILES):
        if (onnx_dir / name).is_file():
            shutil.copy2(onnx_dir / name, tmp / name)
    shutil.copy2(EXAMPLE, tmp / EXAMPLE.name)
    return tmp


def write_manifest(bundle: Path, info: dict) -> dict:
    """Checksums of every file but the manifest itself, plus provenance; written last."""
    files = {f.name: {"sha256": sha256(f), "bytes": f.stat().st_size}
             for f in sorted(bundle.iterdir()) if f.is_file() and f.name != MANIFEST}
    manifest = {"files": files, "packages": package_versions(), "python": sys.version.split()[0],
                "git_commit": git_commit(), "slurm_job_id": env.slurm_job_id(), **info}
    atomic_write_json(bundle / MANIFEST, manifest)
    return manifest


def publish(staging: Path, final: Path, replace: bool = False) -> Path:
    """Rename the staged bundle into place (one rename: readers see all of it or nothing)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        if not replace:
            raise FileExistsError(f"{final} exists; bundles are immutable: bump the version")
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(staging, final)
    return final


def verify(bundle: str | Path) -> list[str]:
    """Problems with a bundle (empty: good): manifest, checksums, sizes, unlisted files, ONNX loadability."""
    bundle = Path(bundle)
    if not (bundle / MANIFEST).is_file():
        return [f"{bundle}: no {MANIFEST} (not a bundle, or an unfinished one)"]
    try:
        files = json.loads((bundle / MANIFEST).read_text())["files"]
    except (json.JSONDecodeError, KeyError) as e:
        return [f"{bundle / MANIFEST}: unreadable ({e})"]
    problems = []
    for name, want in files.items():
        path = bundle / name
        if not path.is_file():
            problems.append(f"{path}: listed in the manifest but missing")
        elif path.stat().st_size != want["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {want['bytes']}")
        elif sha256(path) != want["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest (modified or corrupted)")
    for path in sorted(bundle.iterdir()):
        if path.name != MANIFEST and path.name not in files:
            problems.append(f"{path}: not in the manifest (added after shipping?)")
    if not problems:  # load only files whose bytes are the shipped ones
        import onnx
        import onnxruntime as ort

        for name in (n for n in files if n.endswith(".onnx")):
            try:
                onnx.checker.check_model(str(bundle / name))
                ort.InferenceSession(str(bundle / name), providers=["CPUExecutionProvider"])
            except Exception as e:  # noqa: BLE001 - any failure to load is the finding
                problems.append(f"{bundle / name}: does not load ({type(e).__name__}: {e})".split("\n")[0])
    return problems


def verify_main(bundle: str) -> int:
    problems = verify(bundle)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if problems:
        return 1
    n = len(json.loads((Path(bundle) / MANIFEST).read_text())["files"])
    print(f"ok: {bundle}: {n} files match manifest.json; ONNX models load")
    return 0
