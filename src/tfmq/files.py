"""Outputs that never destroy a user's data: checked before the work, written atomically, replaced safely.

tfmq replaces only what it wrote itself. A folder it writes carries a marker (`.tfmq-output`, JSON) listing
every file in it; a file it writes is recognised by its own content (`owned_file` predicates). Anything
else at an output path is refused unless the caller passes `overwrite=True`, and a path that holds the
current folder, the root, the home folder or one of the run's inputs is refused even then.

A folder is written in a staging folder beside it and swapped in by rename-aside-then-rename, so a complete
output exists at every moment: the new one staged, the previous one set aside. A run killed between the two
renames leaves both under hidden names; the next run on that path restores or removes them
(`recover_stale`). Staging names carry the writer's process id, so a live run's staging is never touched.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tfmq.errors import TfmqError

MARKER_FILE = ".tfmq-output"
WRITTEN_BY = "tfmq"
STAGING_TAG = "tfmq-staging"
PREVIOUS_TAG = "tfmq-previous"
# A file output is tfmq's own when its content says so; kinds register their predicate here.
OwnedFile = Callable[[Path], bool]


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _chmod_default(path: Path, directory: bool) -> None:
    """Permissions as a plain `open`/`mkdir` would give under the user's umask (mkstemp/mkdtemp use 0600/0700)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _hidden_name(path: Path, tag: str) -> str:
    return f".{path.name}.{tag}-{os.getpid()}-"


def _owner_alive(name: str, path: Path, tag: str) -> bool:
    match = re.fullmatch(re.escape(f".{path.name}.{tag}-") + r"(\d+)-.*", name)
    if match is None:
        return True  # not ours: treat as live, never touched
    pid = int(match.group(1))
    return pid != os.getpid() and process_alive(pid)


def process_alive(pid: int) -> bool:
    """Whether process `pid` still runs (one of another user's counts as running): what tells a killed run's
    leftovers from a live run's work in progress."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a folder tfmq wrote, or None (no marker, or not one of ours)."""
    try:
        marker = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(marker, dict) or marker.get("written_by") != WRITTEN_BY or not isinstance(
            marker.get("files"), list):
        return None
    return marker


def _relative_files(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*")
                  if not path.is_dir() or path.is_symlink())


def _owned_folder(folder: Path, kind: str) -> str | None:
    """None if `folder` is a complete tfmq output of `kind` holding nothing but what tfmq wrote, else why not."""
    marker = read_marker(folder)
    if marker is None:
        return "it was not written by tfmq"
    if marker.get("kind") != kind:
        return f"it is a tfmq {marker.get('kind')} output, not a {kind}"
    extra = sorted(set(_relative_files(folder)) - set(marker["files"]) - {MARKER_FILE})
    if extra:
        return f"it holds files tfmq did not write ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''})"
    return None


def _overlap(path: Path, other: Path) -> bool:
    """True if one of the two paths contains the other (or they are the same)."""
    return path == other or path in other.parents or other in path.parents


def _check_not_precious(path: Path, protected: Iterable[str | Path], folder: bool) -> None:
    """Refuse the root, the home folder, a path holding the current folder, and (a folder) any overlap with an
    input or (a file) an input itself: a file may go into an input folder (eval's metrics.json)."""
    resolved = path.resolve()
    if resolved.parent == resolved or resolved == Path.home().resolve():
        raise TfmqError(f"refusing to write output at {path}: it is the root or the home folder")
    current = Path.cwd().resolve()
    if resolved == current or resolved in current.parents:
        raise TfmqError(f"refusing to write output at {path}: it holds the current folder")
    for item in protected:
        if folder and _overlap(resolved, Path(item).resolve()) or resolved == Path(item).resolve():
            raise TfmqError(f"refusing to write output at {path}: it overlaps the input {item}")


def _check_writable_parent(path: Path) -> None:
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise TfmqError(f"cannot write {path}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise TfmqError(f"cannot write {path}: {ancestor} is not writable")


def check_output_folder(path: str | Path, kind: str, *, overwrite: bool = False,
                        protected: Iterable[str | Path] = ()) -> Path:
    """Refuse, before any work, an output folder tfmq may not replace or cannot write; returns `path`.

    Replaceable: nothing there, an empty folder, or a tfmq output of `kind` with nothing added by hand;
    with `overwrite`, anything but a precious path (see the module docstring) or one of `protected`.
    """
    path = Path(path)
    _check_not_precious(path, protected, folder=True)
    _check_writable_parent(path)
    if not os.path.lexists(path) or overwrite:
        return path
    if path.is_symlink() or not path.is_dir():
        raise TfmqError(f"{path} exists and is not a folder: pass --overwrite to replace it, or choose another path")
    if any(path.iterdir()):
        reason = _owned_folder(path, kind)
        if reason is not None:
            raise TfmqError(f"{path} exists and {reason}: pass --overwrite to replace it, or choose another path")
    return path


def check_output_file(path: str | Path, owned: OwnedFile, *, overwrite: bool = False,
                      protected: Iterable[str | Path] = ()) -> Path:
    """Refuse, before any work, an output file tfmq may not replace or cannot write; returns `path`.
    `owned(path)` says whether an existing file is one tfmq wrote (then it may be replaced)."""
    path = Path(path)
    _check_not_precious(path, protected, folder=False)
    _check_writable_parent(path)
    if path.is_dir() and not path.is_symlink():
        raise TfmqError(f"{path} is a folder: give a file path for this output")
    if os.path.lexists(path) and not overwrite and (path.is_symlink() or not owned(path)):
        raise TfmqError(f"{path} exists and was not written by tfmq: pass --overwrite to replace it, "
                        "or choose another path")
    return path


def recover_stale(path: Path) -> None:
    """Clean up after a run on `path` that was killed: remove its staging leftovers, and put a previous
    output set aside back in place if no output is there (else drop it when it is a tfmq output)."""
    parent = path.absolute().parent
    if not parent.is_dir():
        return
    for entry in sorted(parent.iterdir()):
        for tag in (STAGING_TAG, PREVIOUS_TAG):
            if entry.name.startswith(f".{path.name}.{tag}-") and not _owner_alive(entry.name, path, tag):
                if tag == PREVIOUS_TAG and not os.path.lexists(path):
                    os.rename(entry, path)
                elif tag == STAGING_TAG or read_marker(entry) is not None:
                    _remove(entry)


def _swap_in(staging: Path, path: Path) -> None:
    """Rename-aside-then-rename: at every moment a complete output exists under some name."""
    if not os.path.lexists(path):
        os.rename(staging, path)
        return
    aside = path.absolute().parent / f"{_hidden_name(path, PREVIOUS_TAG)}{secrets.token_hex(4)}"
    os.rename(path, aside)
    os.rename(staging, path)
    _remove(aside)


def _write_marker(staging: Path, kind: str) -> None:
    """List what was written, and give it the umask's permissions (some writers, like safetensors, make 0600)."""
    for entry in staging.rglob("*"):
        if not entry.is_symlink():
            _chmod_default(entry, directory=entry.is_dir())
    marker = {"written_by": WRITTEN_BY, "kind": kind, "files": _relative_files(staging)}
    (staging / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


@contextmanager
def atomic_directory(path: str | Path, *, kind: str = "output", overwrite: bool = False,
                     protected: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a staging folder beside `path`; on success it replaces `path` whole, on error it vanishes.

    Checked as `check_output_folder` is, first; an I/O failure while writing is a one-line TfmqError.
    """
    path = Path(path)
    protected = list(protected)
    check_output_folder(path, kind, overwrite=overwrite, protected=protected)
    try:
        recover_stale(path)
        path.absolute().parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=_hidden_name(path, STAGING_TAG), dir=path.absolute().parent))
        _chmod_default(staging, directory=True)
    except OSError as exc:
        raise TfmqError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        yield staging
        _write_marker(staging, kind)
        check_output_folder(path, kind, overwrite=overwrite, protected=protected)  # it may have changed meanwhile
        _swap_in(staging, path)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise TfmqError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def remove_output_folder(path: str | Path, kind: str) -> bool:
    """Delete a tfmq output folder of `kind` holding nothing but what tfmq wrote; anything else stays.
    Returns whether it was deleted."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir() or _owned_folder(path, kind) is not None:
        return False
    shutil.rmtree(path)
    return True


def start_output_folder(path: str | Path, kind: str) -> Path:
    """Make an empty tfmq output folder of `kind` that grows file by file (`add_to_output_folder`), such as
    a run's checkpoints; the caller has checked the path (`check_output_folder`)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        _chmod_default(path, directory=True)
        _write_marker(path, kind)
    except OSError as exc:
        raise TfmqError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path


def add_to_output_folder(folder: Path, name: str) -> None:
    """Record in a tfmq output folder's marker that tfmq also wrote `name` there (e.g. eval's metrics.json),
    so the folder stays replaceable. A folder without a marker is left as it is."""
    marker = read_marker(folder)
    if marker is not None and name not in marker["files"]:
        marker["files"] = sorted([*marker["files"], name])
        write_text_atomic(folder / MARKER_FILE, json.dumps(marker, indent=2) + "\n")


def write_bytes_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(temporary)` on a file in `path`'s folder, then rename it over `path`: readers never see
    half a file. The caller checks the path first (`check_output_file`)."""
    path = Path(path)
    try:
        recover_stale(path)
        path.absolute().parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=_hidden_name(path, STAGING_TAG), dir=path.absolute().parent)
        os.close(handle)
        _chmod_default(Path(temporary), directory=False)
    except OSError as exc:
        raise TfmqError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        write(Path(temporary))
        _chmod_default(Path(temporary), directory=False)  # some writers (safetensors) replace the file as 0600
        os.replace(temporary, path)
    except OSError as exc:
        Path(temporary).unlink(missing_ok=True)
        raise TfmqError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: non-finite floats are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def write_json(path: str | Path, payload: object) -> Path:
    """Valid JSON (non-finite floats as null), written atomically."""
    return write_text_atomic(path, json.dumps(_finite(payload), indent=2, allow_nan=False) + "\n")


def owned_json(path: Path) -> bool:
    """A JSON file tfmq writes as an output of its own (`--json`): a JSON object stamped `written_by`."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(payload, dict) and payload.get("written_by") == WRITTEN_BY


def stamped(payload: dict[str, Any]) -> dict[str, Any]:
    """`payload` with the stamp that lets a later run recognise the file as tfmq's (`owned_json`)."""
    return {"written_by": WRITTEN_BY, **payload}


def owned_safetensors(path: Path) -> bool:
    """A safetensors file tfmq wrote (calibration set, statistics): its header metadata is stamped `written_by`.
    Reads the header only, whatever the file's size."""
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 0 < size <= 100_000_000:
                return False
            header = json.loads(handle.read(size).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(metadata, dict) and metadata.get("written_by") == WRITTEN_BY
