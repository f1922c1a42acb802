"""Where runs and models live, and writes that are never seen half-done."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from training.errors import UserError


def home() -> Path:
    return Path(os.environ.get("TLSERVE_HOME", "."))


def runs_dir(override: str | Path | None = None) -> Path:
    return Path(override) if override else home() / "runs"


def models_dir(override: str | Path | None = None) -> Path:
    return Path(override) if override else home() / "models"


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write to a temp file in the same folder, then rename over the target: never half-written."""
    path = Path(path)
    with _writable(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        _umask_mode(tmp)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _writable(target: Path) -> Iterator[None]:
    """Name the user's path when its folder cannot be made or written, not our temporary file's."""
    try:
        yield
    except OSError as exc:
        raise UserError(f"cannot write {target}: {exc.strerror}") from None


def _umask_mode(path: str) -> None:
    # mkstemp creates 0600; a record or manifest should be as readable as any other file.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays reach records from metrics; keep them plain JSON.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


@contextlib.contextmanager
def staged_dir(final: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a hidden staging folder beside `final` that becomes `final` only if the block succeeds.

    An existing `final` is swapped out only at the very end (so a failure
    leaves it intact) and removed after the new one is in place.
    """
    final = Path(final)
    with _writable(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield staging
        promote(staging, final, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def promote(staging: Path, final: Path, *, overwrite: bool) -> None:
    """Rename a finished staging folder into place, replacing `final` if allowed."""
    old = None
    if final.exists():
        if not overwrite:
            shutil.rmtree(staging, ignore_errors=True)
            raise FileExistsError(str(final))
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
