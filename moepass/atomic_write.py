"""Writing outputs atomically: a reader (or a crash) sees the old output or the complete new one.

Everything is written to a temporary sibling of the target, then renamed onto it in one step. An
existing directory is replaced only when asked (`overwrite`), and only when its manifest says moepass
wrote it — never an arbitrary directory (a user's checkpoint) a mistyped path happens to name.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from moepass.errors import ArtifactError

logger = logging.getLogger("moepass")

# an earlier output holds one of these documents naming its format: a moepass artifact, an ONNX
# export, a transformers checkpoint moepass wrote (`save(format="hf")`), a `compress` report (which
# an analysis-only recipe writes alone). A config.json alone is no mark: every checkpoint a user
# downloaded or trained holds one.
OUTPUT_MARKERS = {
    "manifest.json": "moepass-artifact",
    "onnx_manifest.json": "moepass-onnx",
    "moepass.json": "moepass-hf-checkpoint",
    "report.json": "moepass-report",
}


def output_directory(path: str | os.PathLike, overwrite: bool) -> Path:
    """`path` made absolute, once it is known that a directory can be written there — checked before
    any work so that minutes of compression do not end in an unwritable target."""
    path = Path(os.path.abspath(path))  # "." and "x/.." name no directory to stage beside
    if Path.cwd().is_relative_to(path):
        raise ArtifactError(f"{path} is the current directory or holds it; name a directory inside it")
    if path.exists():
        if not path.is_dir():  # before the overwrite advice, which could not help
            raise ArtifactError(f"{path} is a file; name a directory")
        if not overwrite:
            raise ArtifactError(f"{path} already exists; pass overwrite=True (CLI: --force) to replace it")
        entries = sorted(os.listdir(path))
        if entries and not _earlier_output(path):
            shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
            raise ArtifactError(
                f"{path} holds {shown} but no moepass manifest ({', '.join(OUTPUT_MARKERS)}): not an "
                "earlier output of moepass, so overwrite (--force) will not delete it; name another "
                "directory or empty it yourself"
            )
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ArtifactError(f"cannot write {path}: {parent} is not a writable directory")
    return path


def _earlier_output(path: Path) -> bool:
    return any(names_format(path / name, format) for name, format in OUTPUT_MARKERS.items())


def names_format(path: str | os.PathLike, format: str) -> bool:
    """Whether `path` is a JSON document naming `format`: how moepass knows its own outputs (and only
    those) may be replaced."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(document, dict) and document.get("format") == format


def write_atomically(path: str | os.PathLike, fill: Callable[[Path], None], overwrite: bool) -> Path:
    """Let `fill` write a temporary directory beside `path`, then rename it to `path` in one step;
    whatever fails, `path` is either untouched or complete."""
    path = output_directory(path, overwrite)
    _warn_about_leftovers(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(path), dir=path.parent))
    except OSError as error:
        raise ArtifactError(f"cannot write {path}: {error}") from None
    try:
        fill(staging)
        _normal_permissions(staging)
        if path.exists():
            if not overwrite:
                raise ArtifactError(f"{path} appeared while writing; not replacing it")
            _replace(path, staging)
        else:
            os.replace(staging, path)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        _raise_write_error(error, path)
    return path


def write_file_atomically(path: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Let `fill` write a temporary file beside `path`, then rename it to `path`: a failure leaves
    neither a half-written `path` nor a stray temporary file."""
    path = Path(os.path.abspath(path))
    try:
        descriptor, name = tempfile.mkstemp(prefix=_staging_prefix(path), suffix=path.suffix, dir=path.parent)
    except OSError as error:
        raise ArtifactError(f"cannot write {path}: {error}") from None
    os.close(descriptor)
    temporary = Path(name)
    try:
        fill(temporary)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp creates 0600
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        _raise_write_error(error, path)
    return path


def _raise_write_error(error: BaseException, path: Path):
    """A full disk or a permission denied mid-write is bad input, not a bug: say which output failed."""
    if isinstance(error, OSError):
        reason = error.strerror or str(error)
        raise ArtifactError(f"cannot write {path}: {reason}; nothing was written") from error
    raise error


def _staging_prefix(path: Path) -> str:
    return f".{path.name}.moepass-tmp."


def _warn_about_leftovers(path: Path) -> None:
    """A write killed outright (SIGKILL, the OOM killer) cannot clean up: name what it left, which may
    be as large as the output, rather than let it pile up unseen."""
    leftovers = sorted(path.parent.glob(_staging_prefix(path) + "*")) if path.parent.is_dir() else []
    if leftovers:
        size = sum(f.stat().st_size for item in leftovers for f in item.rglob("*") if f.is_file())
        logger.warning(
            "%s: left by an interrupted earlier write (%.1f MiB); delete them unless another write to %s "
            "is running",
            ", ".join(str(item) for item in leftovers),
            size / 2**20,
            path,
        )


def _replace(path: Path, staging: Path) -> None:
    """Swap `staging` in for the existing `path`; if that fails, the old `path` is put back."""
    old = Path(tempfile.mkdtemp(prefix=_staging_prefix(path) + "old.", dir=path.parent))
    try:
        os.replace(path, old / path.name)
    except BaseException:
        old.rmdir()
        raise
    try:
        os.replace(staging, path)
    except BaseException:
        os.replace(old / path.name, path)
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _normal_permissions(root: Path) -> None:
    """mkdtemp creates 0700; give the result the permissions a plain mkdir/open would (umask applied)."""
    umask = _umask()
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~umask)
