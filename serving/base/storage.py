"""Where runs and models live, and writes that are never seen half-done."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from serving.base.errors import UserError


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
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: Path, data: bytes) -> None:
    """write_text for binary files (a PNG): temp file in the same folder, then rename."""
    path = Path(path)
    with _writable(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        _umask_mode(tmp)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
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


def _umask_mode(path: str, *, directory: bool = False) -> None:
    # mkstemp creates 0600 (mkdtemp 0700); a record, manifest or model folder should be as readable
    # as anything else the user creates.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


STAGING_SUFFIX = ".partial"
# `.<name>.<pid>-<random>.partial`: made by staged_dir (and by promote for the folder it replaces).
_STAGING = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-(?:[a-z0-9_]{8}|old)\.partial$")
# Names from before the pid was part of them: stale once nothing has touched them for this long.
_UNOWNED_STALE_SECONDS = 3600


def stale_staging(folder: Path, name: str | None = None) -> list[Path]:
    """Staging folders in `folder` (of the export or report `name`, or all) left by processes that died.

    A run's own `.<name>.partial` is not among them: it is an interrupted run, kept for --resume."""
    found = []
    for path in sorted(Path(folder).glob(".*" + STAGING_SUFFIX)) if Path(folder).is_dir() else []:
        if (path / "config.json").is_file() and not path.name.startswith(".."):
            continue  # `.<run>.partial`: an interrupted run, whatever its name looks like
        match = _STAGING.match(path.name)
        if match:
            if (name is None or match["name"] == name) and not _alive(int(match["pid"])):
                found.append(path)
        elif re.match(r"^\..+\.[a-z0-9_]{8}\.partial$", path.name):
            if (name is None or path.name.startswith(f".{name}.")) and _idle_for(path) > _UNOWNED_STALE_SECONDS:
                found.append(path)
    return found


def remove_stale_staging(folder: Path, name: str | None = None) -> list[Path]:
    removed = []
    for path in stale_staging(folder, name):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _idle_for(path: Path) -> float:
    import time  # noqa: PLC0415

    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


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
        # The pid in the name tells a later command whether the process that made it is alive.
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}-", suffix=STAGING_SUFFIX,
                                        dir=final.parent))
        _umask_mode(str(staging), directory=True)  # mkdtemp makes 0700; runs/ and models/ are alike
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
        old = final.with_name(f".{final.name}.{os.getpid()}-old{STAGING_SUFFIX}")
        os.replace(final, old)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
