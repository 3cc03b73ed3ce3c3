"""Files written so that a reader sees the old version or the new one, never half of one; digests; directory
locks. Below everything: the data pipeline, the training loop, checkpoints and export all write through here.

    atomic_write_json(path, obj)               # small files whole: temp beside it, fsync file, rename, fsync dir
    with atomic_file(path) as f: f.write(...)  # streamed writes, same guarantee; the temp goes away on error
    with DirLock(out_dir, "pretrain stable"):  # one run per directory; a second one is refused, naming the first

Disk-full errors (ENOSPC, EDQUOT) raised inside these helpers become `DiskFullError` naming the path, with how
much room the write needed and how much is left, instead of a bare OSError traceback.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

TMP_MARK = ".tmp-"   # every temporary file or dir written here has this in its name: `.<name>.tmp-<pid>`


class DiskFullError(OSError):
    """A write failed because the disk (or a quota) is full."""
    need_bytes: int | None = None


class LockedError(RuntimeError):
    """Another live process holds the directory's lock."""


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_message(path, need_bytes: int | None = None) -> str:
    """One line: which path could not be written, how much room there is, and how much was needed."""
    path = Path(path)
    probe = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    need = f"; it needed about {_size(need_bytes)}" if need_bytes else ""
    return f"the disk is full: could not write {path} ({_size(free)} free on that filesystem{need})"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


@contextlib.contextmanager
def disk_full_as_error(path, need_bytes: int | None = None):
    """Turn ENOSPC/EDQUOT inside the block into a DiskFullError about `path`."""
    try:
        yield
    except OSError as e:
        # an inner block that did not know the size needed gets it from an outer one that does
        if is_disk_full(e) and not (isinstance(e, DiskFullError) and (e.need_bytes or not need_bytes)):
            err = DiskFullError(e.errno, disk_full_message(path, need_bytes))
            err.need_bytes = need_bytes
            raise err from None
        raise


def tmp_path_for(path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def fsync_dir(path) -> None:
    """fsync a directory, so a rename inside it survives a power cut (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicWriter:
    """A file written under a temporary name beside `path`: commit() flushes, fsyncs and renames it onto `path`
    (then fsyncs the directory); abort() removes it and leaves `path` as it was. For writers that stay open
    across calls; `atomic_file` is the same as a context manager. durable=False skips the fsyncs (still atomic
    against a killed process, not against a power cut): for scratch files a step verifies or recomputes anyway."""

    def __init__(self, path, mode: str = "wb", durable: bool = True, **open_kwargs):
        self.path = Path(path)
        self.durable = durable
        self.tmp = tmp_path_for(self.path)
        with disk_full_as_error(self.path):
            self.f = open(self.tmp, mode, **open_kwargs)

    def commit(self) -> None:
        with disk_full_as_error(self.path):
            try:
                self.f.flush()
                if self.durable:
                    os.fsync(self.f.fileno())
                self.f.close()
                os.replace(self.tmp, self.path)
            except BaseException:
                self.abort()
                raise
        if self.durable:
            fsync_dir(self.path.parent)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.f.close()
        self.tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path, mode: str = "wb", durable: bool = True, **open_kwargs):
    """Open a temporary file beside `path` for writing; on a clean exit it is flushed, fsynced and renamed onto
    `path` (and the directory fsynced); on an exception it is removed and `path` is left as it was."""
    writer = AtomicWriter(path, mode, durable=durable, **open_kwargs)
    try:
        with disk_full_as_error(path):
            yield writer.f
    except BaseException:
        writer.abort()
        raise
    writer.commit()


def atomic_write_bytes(path, data: bytes) -> None:
    with disk_full_as_error(path, len(data)), atomic_file(path, "wb") as f:
        f.write(data)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj, indent: int | None = 1) -> None:
    atomic_write_bytes(path, (json.dumps(obj, ensure_ascii=False, indent=indent, default=str) + "\n").encode("utf-8"))


def fsync_file(path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def remove_stale_tmp(directory, pattern: str = f"*{TMP_MARK}*") -> int:
    """Remove temporary files and dirs that killed runs left in `directory` (not recursive); -> how many.
    Call it only while holding the directory's lock: a live writer's temp file looks the same."""
    n = 0
    for p in Path(directory).glob(pattern):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- directory locks

LOCK_NAME = ".lock"


class DirLock:
    """An exclusive lock on a directory for the length of a run: `<dir>/.lock` holds the holder's pid, host,
    command and start time, and an fcntl lock on it is held while the run lives. The kernel drops an fcntl lock
    when its process dies, however it dies (kill -9 included), so a lock left by a crash is never mistaken for
    a live one: the next run takes it over and says so. A second live run is refused with a LockedError that
    names the holder.

    The lock is a flock on the open file, so processes forked while it is held (a worker pool) hold it too, until
    the last of them exits: workers that outlive a killed parent still keep a second run out of the directory.
    A lock on a filesystem that does not support them (some network mounts) fails loudly rather than silently."""

    def __init__(self, directory, what: str = ""):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.what = what or " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))
        self._fd: int | None = None
        self.took_over: dict | None = None   # the previous holder's record, when it had died

    def acquire(self) -> "DirLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LockedError(f"{self.directory} is in use by another run: {describe_holder(holder)}. "
                              f"Wait for it to finish, or use another directory") from None
        except OSError as e:
            os.close(fd)
            raise LockedError(f"cannot lock {self.path}: {e} (does this filesystem support file locks?)") from None
        previous = _read_holder(fd)
        if previous:   # the file held a record but nobody held the lock: that run died without releasing it
            self.took_over = previous
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.what,
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)   # an empty file = released cleanly
        os.close(self._fd)               # closing drops the fcntl lock
        self._fd = None

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        return json.loads(raw) if raw else {}
    except (OSError, ValueError):
        return {"command": "unknown (unreadable lock file)"}


def describe_holder(holder: dict) -> str:
    if not holder:
        return "a process that has not written its name yet"
    gone = ""
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:   # the run died; processes it forked still hold the lock
            gone = " (that process has exited; processes it started still hold the lock and will exit soon)"
        except OSError:
            pass
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
            f"`{holder.get('command', '?')}`, started {holder.get('started', '?')}{gone}")


# ----------------------------------------------------------------------------- files as a manifest recorded them

def describe_files(directory, names) -> dict[str, dict]:
    """{name: {"bytes", "sha256"}} of files in `directory`: what a manifest records so that a later "already done"
    check can tell a missing, truncated or corrupted output from a finished one (`check_files`)."""
    directory = Path(directory)
    return {name: {"bytes": (directory / name).stat().st_size, "sha256": file_sha256(directory / name)}
            for name in names}


def check_files(directory, recorded: dict[str, dict], *, content: bool = True, exact_glob: str | None = None) -> list[str]:
    """What differs between the files in `directory` and `recorded` (as `describe_files` wrote it): a file that is
    missing, has another size, or (content=True) another sha256. With `exact_glob`, files matching it that the
    record does not list are problems too (a reader globbing the directory would pick them up). [] = as recorded."""
    directory = Path(directory)
    problems = []
    for name, want in recorded.items():
        path = directory / name
        try:
            size = path.stat().st_size
        except OSError:
            problems.append(f"{path}: missing")
            continue
        if "bytes" in want and size != want["bytes"]:
            problems.append(f"{path}: {size} bytes, the manifest recorded {want['bytes']} (truncated or rewritten)")
        elif content and "sha256" in want and file_sha256(path) != want["sha256"]:
            problems.append(f"{path}: content differs from the sha256 its manifest recorded (corrupted)")
    if exact_glob is not None:
        problems += [f"{p}: not listed in the manifest" for p in sorted(directory.glob(exact_glob))
                     if p.name not in recorded]
    return problems
