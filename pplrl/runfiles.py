"""The files of a run folder: atomic replacement, the folder lock, torn-line tolerant
``metrics.jsonl`` reading and checksummed checkpoint bytes.

Kept free of torch and numpy imports, so that a process that only takes or inspects a
lock stays cheap.

* :func:`atomic_write_bytes` replaces a file through a temporary file in the same folder
  (write, flush, fsync, ``os.replace``, fsync of the folder): a kill at any moment leaves
  either the old or the new content, never an empty or truncated file. A full disk is one
  :class:`DiskFullError` naming the file and "no space left on device"; the temporary
  file is removed and the old file is untouched.
* :class:`RunLock` is an OS lock (``fcntl.flock``) on ``run.lock`` in the folder, holding
  the owner's PID while taken. The OS drops the lock when its process dies, so the lock
  of a dead process is taken over (and said so); a live holder is named by its PID.
* :func:`read_records` reads ``metrics.jsonl``: a torn last line (a kill or a full disk
  in the middle of an append) is dropped with a warning naming the file and line; a bad
  line anywhere else is an error naming them.
* :func:`pack_checkpoint` / :func:`unpack_checkpoint`: checkpoint bytes behind a header
  line with the sha256 of the payload, verified before the payload is unpickled.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux/macOS: no folder lock
    fcntl = None

LOCK = "run.lock"
CHECKSUM_MAGIC = b"PPLRL-CHECKPOINT sha256="


class RunFileError(RuntimeError):
    """A run folder file that cannot be read, written or locked."""


class RunIOError(RunFileError):
    """A run folder file that could not be written (a full disk, permissions)."""


class DiskFullError(RunIOError):
    """No space left on device while writing a run folder file."""


def _describe_os_error(e: OSError, path: Path) -> str:
    if e.errno == errno.ENOSPC:
        return f"no space left on device while writing {path}"
    return f"cannot write {path}: {e.strerror or e}"


def os_error(e: OSError, path: Path, suffix: str = "") -> RunFileError:
    """The RunFileError (a DiskFullError for ENOSPC) for ``e`` raised while writing ``path``."""
    error = DiskFullError if e.errno == errno.ENOSPC else RunIOError
    return error(_describe_os_error(e, path) + suffix)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically (temporary file in the same folder, fsync,
    ``os.replace``). On failure the temporary file is removed and ``path`` is unchanged."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        error = DiskFullError if e.errno == errno.ENOSPC else RunIOError
        raise error(_describe_os_error(e, path)) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a run's files are as readable as any other file
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, or Ctrl-C mid-write: no partial temporary file stays behind
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if not isinstance(e, OSError):
            raise
        error = DiskFullError if e.errno == errno.ENOSPC else RunIOError
        kept = "; the previous file was kept" if path.exists() else ""
        raise error(_describe_os_error(e, path) + kept) from None
    _fsync_folder(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: Path | str) -> list[Path]:
    """Delete the temporary files that a killed process left in a run folder (a SIGKILL or a
    power cut in the middle of :func:`atomic_write_bytes`); call it holding the folder's lock."""
    removed = []
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt"):
        for tmp in Path(folder).glob(f".{name}.*.tmp"):
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    return removed


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path | str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def write_result(path: Path | str, result: dict) -> dict:
    """A benchmark's or experiment's JSON result: folders made, written atomically, its path
    printed; returns ``result``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, result)
    print(f"wrote {path}")
    return result


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def read_records(path: Path | str, *, warn_torn: bool = True) -> list[dict]:
    """The JSON records of a line-per-record file; [] if it does not exist.

    A last line that does not parse (the tail of an interrupted append) is dropped with a
    warning naming the file and line number; any other bad line is a RunFileError naming
    them, so nothing is dropped silently."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    records = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            if not isinstance(record, dict) or "step" not in record or "kind" not in record:
                raise ValueError("not a record with 'step' and 'kind'")
        except ValueError as e:
            if number == len(lines):
                if warn_torn:
                    warn(f"{path}: line {number} is torn (an interrupted write: {e}); it was dropped")
                break
            raise RunFileError(f"{path}: line {number} is not a metrics record ({e})") from None
        records.append(record)
    return records


def encode_records(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def pack_checkpoint(payload: bytes) -> bytes:
    """Checkpoint file bytes: a header line with the payload's sha256, then the payload."""
    return CHECKSUM_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload


def unpack_checkpoint(data: bytes, file: Path) -> bytes:
    """The payload of checkpoint file bytes, after checking the header's sha256."""
    if not data.startswith(CHECKSUM_MAGIC):
        raise RunFileError(f"checkpoint {file} has no checksum header (not a pplrl checkpoint, or one written "
                           f"before checksums); refusing to load it")
    header, sep, payload = data.partition(b"\n")
    expected = header[len(CHECKSUM_MAGIC):].decode(errors="replace")
    if not sep or hashlib.sha256(payload).hexdigest() != expected:
        raise RunFileError(f"checkpoint {file} is corrupt: its sha256 does not match the one recorded in it; "
                           f"nothing in the run folder was changed")
    return payload


class RunLock:
    """An exclusive lock on a run folder (``fcntl.flock`` on ``FOLDER/run.lock``).

    ``acquire`` refuses, naming the holder's PID, while another process (or another
    lock object in this process) holds it. The lock file stays in the folder; it holds
    the owner's PID while locked and is emptied on release, so a non-empty lock file found
    unlocked is the lock of a process that died, which is taken over with a warning."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self.fd: int | None = None
        self.took_over: int | None = None

    def acquire(self) -> RunLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunFileError(f"cannot lock run folder {self.folder}: {e.strerror or e}") from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_pid(fd)
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # e.g. ENOLCK on some NFS mounts
                    raise RunFileError(f"cannot lock run folder {self.folder}: {e.strerror or e} (a file system "
                                       f"without file locks?)") from None
                who = f"PID {holder}" if holder else "another process"
                raise RunFileError(f"run folder {self.folder} is in use by {who} (lock {self.path}); wait for it "
                                   f"to finish or stop it") from None
        stale = _read_pid(fd)
        if stale and stale != os.getpid():
            self.took_over = stale
            warn(f"took over the stale lock of PID {stale} (no longer running) on {self.folder}")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            error = DiskFullError if e.errno == errno.ENOSPC else RunIOError
            raise error(_describe_os_error(e, self.path)) from None
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        os.close(self.fd)  # closing the descriptor drops the flock
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None
