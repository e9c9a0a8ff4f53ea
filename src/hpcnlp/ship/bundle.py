"""The shipped bundle: what deployment teams receive, its manifest, and `hpcnlp verify`.

<root>/<name>/<version>/
  model.onnx, model.int8.onnx   the models (fp32, int8 when made)
  config.json                   id2label / label2id; tokenizer.json + tokenizer_config.json + vocab ...
  onnx_inference.py             inference with onnxruntime + tokenizers only (hpcnlp/ship/onnx_inference.py)
  MODEL_CARD.md, validation.md, validation.json, latency.png
  manifest.json                 sha256 and size of every other file, versions, provenance, gate results
  SHA256SUMS                    every other file's sha256 (manifest.json's too), for `sha256sum -c`

A bundle is built in a staging dir beside its destination and renamed into place in one step
(`publish`), so a half-built bundle never sits where shipped ones go; a rejected one is moved to its own
dir (`reject`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
from importlib import metadata, resources
from pathlib import Path

from hpcnlp.runtime import env
from hpcnlp.runtime.io import atomic_write_json, atomic_write_text, normal_mode, replace_dir

MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"
REQUIRED = ("model.onnx", "config.json", "tokenizer.json", "MODEL_CARD.md", "validation.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
PACKAGES = ("hpcnlp", "torch", "transformers", "tokenizers", "optimum", "optimum-onnx", "onnx", "onnxruntime")
SCRIPT = "onnx_inference.py"  # a module of this package: every install has it, editable or not


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


def stage(onnx_dir: Path, root: Path) -> Path:
    """A staging dir (hidden, beside the destinations) holding the files to validate and ship."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
    normal_mode(tmp)
    # copyfile, not copy2: the copies get this umask's modes, not the source's (a 0600 file stays private).
    for name in ("model.onnx", "model.int8.onnx", "config.json", *TOKENIZER_FILES):
        if (onnx_dir / name).is_file():
            shutil.copyfile(onnx_dir / name, tmp / name)
    for name in model_data_files(onnx_dir):  # a model over 2 GB keeps its weights beside it (model.onnx_data)
        if Path(name).name == name and (onnx_dir / name).is_file():  # else validate's check refused it
            shutil.copyfile(onnx_dir / name, tmp / name)
    (tmp / SCRIPT).write_bytes(resources.files("hpcnlp.ship").joinpath(SCRIPT).read_bytes())
    return tmp


def model_data_files(onnx_dir: Path) -> list[str]:
    """The external data files of the models a bundle ships (hpcnlp.ship.onnx.external_data_files)."""
    from hpcnlp.ship.onnx import external_data_files

    names = [n for n in ("model.onnx", "model.int8.onnx") if (onnx_dir / n).is_file()]
    return sorted({f for n in names for f in external_data_files(onnx_dir / n)})


def sums_text(files: dict) -> str:
    """`sha256sum` output for {name: {"sha256": ...}}: `sha256sum -c` checks it with no hpcnlp at hand."""
    return "".join(f"{f['sha256']}  {name}\n" for name, f in sorted(files.items()))


def write_manifest(bundle: Path, info: dict) -> dict:
    """Checksums of every file but the manifest and SHA256SUMS, plus provenance; then SHA256SUMS, which
    covers manifest.json too. Written last."""
    files = {
        f.name: {"sha256": sha256(f), "bytes": f.stat().st_size}
        for f in sorted(bundle.iterdir())
        if f.is_file() and f.name not in (MANIFEST, SUMS)
    }
    manifest = {
        "files": files,
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "code_version": env.code_version(),
        "slurm_job_id": env.slurm_job_id(),
        **info,
    }
    atomic_write_json(bundle / MANIFEST, manifest)
    atomic_write_text(bundle / SUMS, sums_text({**files, MANIFEST: {"sha256": sha256(bundle / MANIFEST)}}))
    return manifest


def publish(staging: Path, final: Path, replace: bool = False) -> Path:
    """Rename the staged bundle into place: readers see all of the old one or all of the new, never
    neither (an existing bundle is swapped with the new one in one step; see replace_dir)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if replace:
        replace_dir(staging, final)
        return final
    try:  # a rename, never a replace: onto a bundle (never an empty dir) it fails, whoever got there first
        os.rename(staging, final)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(f"{final} exists; bundles are immutable: bump the version") from None
        raise
    return final


def reject(staging: Path, final: Path) -> Path:
    """Move the staged bundle, report included, to where rejected ones go (a rejected one there before is
    replaced): never among shipped bundles."""
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staging), final)
    return final


def name_problem(bundle: Path, name) -> str | None:
    """A manifest names files of this flat dir: a plain name that stays inside it, even through a symlink."""
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\n\0"):
        return f"{bundle / MANIFEST}: {name!r} is not a plain file name in the bundle"
    try:  # a name the filesystem cannot hold (a lone surrogate, over 255 bytes) is no file of the bundle
        if len(os.fsencode(name)) > 255:
            raise ValueError("longer than 255 bytes")
    except (UnicodeError, ValueError) as e:
        return f"{bundle / MANIFEST}: {name!r} is not a file name ({e})"
    if (bundle / name).resolve().parent != bundle.resolve():
        return f"{bundle / MANIFEST}: {name!r} resolves outside the bundle"
    return None


def verify(bundle: str | Path) -> list[str]:
    """Problems with a bundle (empty: good): manifest, checksums, sizes, unlisted files, ONNX loadability."""
    bundle = Path(bundle)
    if not (bundle / MANIFEST).is_file():
        return [f"{bundle}: no {MANIFEST} (not a bundle, or an unfinished one)"]
    try:
        manifest = json.loads((bundle / MANIFEST).read_bytes().decode("utf-8"))
        files = manifest["files"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        return [f"{bundle / MANIFEST}: unreadable ({type(e).__name__}: {e})"]
    if not isinstance(files, dict) or not files:
        return [f"{bundle / MANIFEST}: lists no files"]
    problems = [p for p in (name_problem(bundle, n) for n in files) if p]
    problems += [
        f"{bundle / MANIFEST}: entry {name!r} is not {{bytes: <int>, sha256: <hex>}}"
        for name, want in files.items()
        if not (
            isinstance(want, dict)
            and isinstance(want.get("bytes"), int)
            and not isinstance(want.get("bytes"), bool)
            and isinstance(want.get("sha256"), str)
        )
    ]
    if problems:  # never open a path the manifest may have aimed outside the bundle
        return problems
    problems += [
        f"{bundle / MANIFEST}: does not list {name}, which every bundle has" for name in REQUIRED if name not in files
    ]
    if manifest.get("passed") is not True:
        problems.append(
            f"{bundle / MANIFEST}: passed is {manifest.get('passed')!r}: the gate did not pass "
            "this model (a rejected bundle)"
        )
    for name, want in files.items():
        path = bundle / name
        if not path.is_file():
            problems.append(f"{path}: listed in the manifest but missing")
        elif path.stat().st_size != want["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {want['bytes']}")
        elif sha256(path) != want["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest (modified or corrupted)")
    for path in sorted(bundle.iterdir()):
        if path.name not in (MANIFEST, SUMS) and path.name not in files:
            problems.append(f"{path}: not in the manifest (added after shipping?)")
    want_sums = sums_text({**files, MANIFEST: {"sha256": sha256(bundle / MANIFEST)}})
    if not (bundle / SUMS).is_file():
        problems.append(f"{bundle / SUMS}: missing")
    elif (bundle / SUMS).read_text(errors="replace") != want_sums:
        problems.append(f"{bundle / SUMS}: differs from the manifest's checksums (or manifest.json was changed)")
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
    print(f"ok: {bundle}: {n} files match manifest.json and {SUMS}; the gate passed; ONNX models load")
    return 0
