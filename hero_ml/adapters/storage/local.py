"""The local-directory store: the embedded default."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from hero_ml.adapters.storage.errors import StorageError
from hero_ml.adapters.storage.keys import check_key, check_prefix


def _umask() -> int:
    try:  # Linux says it; elsewhere reading it means setting it, put back at once (at import)
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


# an object's file mode as open() would create it: mkstemp's 0600 would hide a shared root's runs from
# the team's other accounts (the poller, the webhook receiver, a colleague's `hero storage ls`)
_FILE_MODE = 0o666 & ~_umask()


class LocalStore:
    def __init__(self, root: Path):
        # absolute from the start: a relative storage.local_root is the current folder's, and the
        # messages that name it (e.g. "no run 'x' in ...") must say which one
        self.root = Path(root).absolute()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes) -> None:
        """Write beside, fsync, then rename: a crash leaves the old object or none, never a part; a
        failed write (a full disk, no permission) leaves no temporary file and raises StorageError.
        The folders that gained an entry (the object's, and those of folders made for it) are synced
        too: after a power cut, an object written after another (a manifest after its images) is
        never there without it."""
        self._write(key, data, replace=True)

    def create(self, key: str, data: bytes) -> bool:
        """As put, but the written file is hard-linked in place, which fails when the name exists:
        atomic against other creators, and a reader still never sees a part."""
        return self._write(key, data, replace=False)

    def _write(self, key: str, data: bytes, replace: bool) -> bool:
        path = self._path(key)
        tmp: str | None = None
        try:
            new_folders = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as handle:
                with contextlib.suppress(OSError):  # a mount that keeps its own modes (CIFS, vfat)
                    os.fchmod(handle.fileno(), _FILE_MODE)
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            if replace:
                os.replace(tmp, path)
                tmp = None
            else:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return False
            for folder in dict.fromkeys([path.parent, *(new.parent for new in new_folders)]):
                _fsync_folder(folder)
            return True
        except OSError as err:
            raise StorageError(f"cannot write {key} in {self.root}: {err.strerror or err}") from None
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None
        except OSError as err:  # a folder where the object should be, no permission, a failing disk
            raise StorageError(f"cannot read {key} in {self.root}: {err.strerror or err}") from None

    def exists(self, key: str) -> bool:
        path = self._path(key)
        try:
            return path.is_file()
        except OSError as err:  # no permission on a folder on the way
            raise StorageError(f"cannot look for {key} in {self.root}: {err.strerror or err}") from None

    def list(self, prefix: str) -> dict[str, int]:
        prefix = check_prefix(prefix)
        folder = self.root / prefix
        try:
            if not folder.is_dir():
                return {}
            return {
                path.relative_to(self.root).as_posix(): path.stat().st_size
                for path in sorted(folder.rglob("*"))
                if path.is_file() and not path.name.startswith(".")  # dot files: writes in flight
            }
        except OSError as err:  # no permission, a file removed while listed, a failing disk
            raise StorageError(f"cannot list {prefix or '/'} in {self.root}: {err.strerror or err}") from None

    def where(self, key: str = "") -> str:
        return str(self.root / check_key(key)) if key else str(self.root)


def _fsync_folder(folder: Path) -> None:
    """Make the folder's entries (a rename, a new subfolder) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
