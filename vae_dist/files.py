"""Writing so that no result is lost: the one mechanism every writer uses (training, prepare, export,
the browser site). No torch.

- A file is written under a temporary name and renamed over the old one (`atomic_write`): a kill
  or a full disk leaves the old file or none, never a partial one.
- A folder is built whole in a staging folder beside it, `.NAME.partial-HOST-PID`, and published
  by rename (`publish`): the old folder is moved aside to `.NAME.old-HOST-PID`, the new one renamed in,
  the old one removed. A process killed between the two renames leaves the old folder aside; the
  next writer or reader of that place puts it back (`restore_moved_aside`), and removes what
  dead processes left staged (`new_staging`).
- A write that fails (no room, a quota or file size limit, a read-only folder) becomes one
  `WriteError` naming the file (`writing`), also when the library that wrote says it its own way.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vae_dist.errors import UserError

log = logging.getLogger(__name__)

NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})  # a full disk, quota or file size limit
WRITE_ERRNOS = NO_ROOM | {errno.EROFS, errno.EACCES, errno.EPERM}  # what only a failed write says
STAGING_MARK = ".partial-"  # .NAME.partial-HOST-PID: a folder being built, beside the one it becomes
ASIDE_MARK = ".old-"  # .NAME.old-HOST-PID: the folder it replaces, between the two renames of a publish
PROBE_BYTES = 64 * 1024  # what check_writable writes, to find a full disk before the work


class WriteError(UserError):
    """A file could not be written; nothing written before was changed."""

    def __init__(self, message: str, path: Path | None = None, reason: str = "", no_room: bool = True):
        super().__init__(message)
        self.path, self.reason, self.no_room = path, reason, no_room


# ---------------------------------------------------------------- files


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` then rename over `path`: a kill or a full disk leaves the old file (or none),
    never a partial one; a failed write's partial temporary file is removed. The temporary name is
    the writing process's own, so processes writing the same file at once never mix their bytes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """One JSON line appended and fsynced; a failed append is cut back off, so the file never ends
    in a partial line (a kill during the write can still tear the last line: `read_jsonl`). A
    record holding NaN or an infinity is a bug (ValueError): no file gets a non-standard token."""
    path = Path(path)
    size = path.stat().st_size if path.exists() else None
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")  # standard JSON: no NaN or Infinity token
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        if size is None:
            path.unlink(missing_ok=True)
        else:
            os.truncate(path, size)
        raise


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, read a block at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (none if it does not exist). A last line torn by a kill
    during its append is left out; a damaged line before it raises ValueError."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
    return records


# ---------------------------------------------------------------- folders


def _marked(target: Path, mark: str, pid: int | None) -> Path:
    # The host too: on a folder shared by several machines, a process id means something only on
    # the machine that made the name, so only that machine ever judges the folder left behind.
    return target.with_name(f".{target.name}{mark}{socket.gethostname()}-{os.getpid() if pid is None else pid}")


def staging_name(target: Path, pid: int | None = None) -> Path:
    """Where process `pid` of this machine (this process by default) builds the folder that
    becomes `target`."""
    return _marked(Path(target), STAGING_MARK, pid)


def aside_name(target: Path, pid: int | None = None) -> Path:
    """Where process `pid` of this machine keeps the `target` it replaces, between the two renames."""
    return _marked(Path(target), ASIDE_MARK, pid)


def moved_aside(target: Path) -> list[Path]:
    """Copies of `target` that a publish killed between its two renames left aside."""
    return _left_by_dead(Path(target), ASIDE_MARK)


def _left_by_dead(target: Path, mark: str) -> list[Path]:
    """The folders `mark`ed for `target` by processes of this machine that are gone."""
    prefix = f".{target.name}{mark}{socket.gethostname()}-"
    found = []
    for path in target.parent.glob(f"{glob_escape(prefix)}*"):
        pid = path.name[len(prefix) :]
        if path.is_dir() and pid.isdigit() and not process_exists(int(pid)):
            found.append(path)
    return sorted(found)


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_staging(target: Path) -> list[Path]:
    """Remove the staging folders of `target` whose process is gone (killed mid-way); those of
    running processes stay. Returns what was removed."""
    removed = _left_by_dead(Path(target), STAGING_MARK)
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    if removed:
        log.info("removed the files left for %s by a process that did not finish", target)
    return removed


def restore_moved_aside(target: Path) -> bool:
    """Put back a `target` that a publish killed between its two renames left aside; remove such
    copies when `target` is in place (the publish was complete). True if one was put back."""
    target = Path(target)
    restored = False
    for aside in _left_by_dead(target, ASIDE_MARK):
        try:
            if not target.exists():
                os.replace(aside, target)
                log.warning("put back %s, which a replacement that did not finish had moved aside", target)
                restored = True
            else:
                shutil.rmtree(aside, ignore_errors=True)
        except FileNotFoundError:  # another process put it back first
            pass
    return restored


def restore_all_moved_aside(folder: Path) -> list[Path]:
    """`restore_moved_aside` for every folder under `folder` that was being replaced."""
    targets = set()
    for aside in Path(folder).glob(f".*{ASIDE_MARK}*"):
        name, _, owner = aside.name[1:].rpartition(ASIDE_MARK)
        if name and owner.rpartition("-")[2].isdigit():
            targets.add(aside.with_name(name))
    return [t for t in sorted(targets) if restore_moved_aside(t)]


def new_staging(target: Path) -> Path:
    """An empty staging folder for `target`, beside it; what killed processes left staged for the
    same target is removed first, and a `target` left aside by one is put back."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    restore_moved_aside(target)
    remove_stale_staging(target)
    staging = staging_name(target)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


@contextmanager
def staged(target: Path) -> Iterator[Path]:
    """A staging folder for `target` (`new_staging`), removed if the block fails; publish it with
    `publish` inside the block."""
    staging = new_staging(target)
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once published


def publish(src: Path, dst: Path, keep_existing: Callable[[Path], bool] | None = None) -> bool:
    """Move the folder `src` to `dst`, replacing it: `dst` is never a mix of old and new files,
    stays as it was if the move fails, and is put back by the next `restore_moved_aside` if the
    process is killed between the two renames. With `keep_existing`, a `dst` for which it answers
    True (e.g. a complete copy another process published first) is kept and `src` removed;
    returns False then."""
    src, dst = Path(src), Path(dst)
    restore_moved_aside(dst)
    if keep_existing is not None and dst.exists() and keep_existing(dst):
        shutil.rmtree(src, ignore_errors=True)
        return False
    old = None
    if dst.exists():
        old = aside_name(dst)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    try:
        os.replace(src, dst)
    except OSError as e:
        if old is not None:
            os.replace(old, dst)
        elif e.errno in (errno.ENOTEMPTY, errno.EEXIST) and keep_existing is not None and keep_existing(dst):
            shutil.rmtree(src, ignore_errors=True)  # another process published a complete one meanwhile
            return False
        raise
    except BaseException:
        if old is not None:
            os.replace(old, dst)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return True


# ---------------------------------------------------------------- failed writes


def failure_reason(e: BaseException, folder: Path, room_for: int = 0) -> tuple[str, bool, OSError | None] | None:
    """(why, whether for want of room, the OSError) if `e` is a failed write; None for anything
    else, which stays a bug. The OSError is looked for along `e`'s causes. safetensors and torch's
    checkpoint writer do not raise OSError, onnxruntime raises its own types or leaves a truncated
    file: their messages are recognised, and when a step that writes about `room_for` bytes fails
    otherwise, `folder` is asked whether that much still fits."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        # The error itself, raised inside the write, is one; along its causes, only an error that
        # says writing failed (another OSError there may be what a bug was handling)
        if isinstance(cause, OSError) and (cause is e or cause.errno in WRITE_ERRNOS):
            return cause.strerror or os.strerror(cause.errno or 0) or str(cause), cause.errno in NO_ROOM, cause
        cause = cause.__cause__ or cause.__context__
    text = str(e)
    found = re.search(r"os error (\d+)", text)  # safetensors (Rust) reports the errno this way
    if found:
        number = int(found.group(1))
        return os.strerror(number), number in NO_ROOM, None
    if isinstance(e, RuntimeError) and ("unexpected pos" in text or "file write failed" in text):
        # torch's zip writer drops the errno; say what is most likely
        if _free_bytes(folder) < 16 * 2**20:
            return os.strerror(errno.ENOSPC), True, None
        return "the write was cut short (disk full or a file size limit)", True, None
    refused = room_refused(folder, room_for) if room_for else None
    if refused is not None:
        return refused.strerror or os.strerror(refused.errno or 0), True, refused
    return None


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 1 << 62


def room_refused(folder: Path, size: int) -> OSError | None:
    """The error a write of `size` bytes into `folder` meets for want of room; None if it fits."""
    if size <= 0:
        return None
    probe = Path(folder) / f".room-probe-{os.getpid()}"
    block = bytes(min(size, 1 << 20))
    try:
        with open(probe, "wb") as f:
            for start in range(0, size, len(block)):
                f.write(block[: size - start])
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e if e.errno in NO_ROOM else None
    finally:
        probe.unlink(missing_ok=True)
    return None


def newest_file(where: Path) -> Path:
    """The file under `where` written last (the one a failed write was writing), else `where`."""
    if not where.is_dir():
        return where
    found = [p for p in where.rglob("*") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else where


@contextmanager
def writing(where: Path, room_for: int = 0) -> Iterator[None]:
    """Turn a failed write of `where` (a file, or a folder being filled) into a WriteError naming
    the file; other errors pass through unchanged. `room_for`: see `failure_reason`."""
    where = Path(where)
    try:
        yield
    except WriteError:
        raise
    except Exception as e:
        found = failure_reason(e, where if where.is_dir() else where.parent, room_for)
        if found is None:
            raise
        reason, no_room, error = found
        if error is not None and error.filename:
            path = Path(os.fsdecode(error.filename))
        else:
            path = newest_file(where)
        raise WriteError(f"cannot write {path} ({reason})", path, reason, no_room) from e


# ---------------------------------------------------------------- one writer at a time


class Busy(UserError):
    """Another process is writing the same place."""


def lock_name(target: Path) -> Path:
    """The lock file of `target`: `.NAME.lock` beside it."""
    return Path(target).with_name(f".{Path(target).name}.lock")


@contextmanager
def one_writer(target: Path, what: str, todo: str) -> Iterator[None]:
    """Be the one process writing `target` for the block, or raise Busy naming the process that is
    (`what` names the target in words, `todo` says what to do instead).

    The lock is a POSIX record lock (`fcntl.lockf`) on `.NAME.lock` beside the target: the kernel
    releases it when its process ends, killed or not, so none is left stuck, and a network file
    system (NFS) hands it to its lock manager, so processes of several machines sharing the folder
    see it too. The file is removed when the block ends; a process that locked a file removed
    meanwhile tries again, so two processes never both hold one."""
    import fcntl
    import time

    path = lock_name(target)
    made = not path.parent.exists()
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # checked before any work: a read-only or full folder says so at once
            raise _cannot_write_into(path.parent, e) from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):  # a file system without record locks
                log.warning("cannot lock %s (%s): going on without keeping other writers out", path, e.strerror)
                break
            holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if made:
                _remove_if_empty(path.parent)
            raise Busy(f"{what} is being written by {holder}; {todo}") from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder before removed this file: lock the new one
    try:
        stamp = f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, stamp.encode(), 0)
        except OSError as e:
            raise _cannot_write_into(path.parent, e) from None
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
        if made:
            _remove_if_empty(path.parent)


def check_json_output(path: Path, fmt: str, earlier_keys: frozenset[str] = frozenset()) -> None:
    """Refuse, before any work, an output `path` that exists and is not a JSON object of format
    `fmt` (a result of the same command; `earlier_keys`: what its results held before they named
    their format): a command replaces only what it wrote."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; name the JSON file to write")
    if path.exists():
        try:
            found = json.loads(path.read_text())
        except (OSError, ValueError):
            found = None
        ours = isinstance(found, dict) and (found.get("format") == fmt or (earlier_keys and earlier_keys <= set(found)))
        if not ours:
            raise UserError(f"{path} exists and is not a {fmt} result; it is replaced only by its own kind: "
                            "choose another file")
    check_writable(path.parent)


def check_writable(folder: Path) -> None:
    """Refuse, before any work, a folder this process cannot write into (read-only, no permission,
    a full disk): a WriteError in one line. The folder may not exist yet: its nearest existing
    parent is tried."""
    folder = Path(folder)
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    probe = folder / f".write-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        try:
            with open(probe, "wb") as f:  # a few blocks, on disk: a full one says so now
                f.write(bytes(PROBE_BYTES))
                f.flush()
                os.fsync(f.fileno())
        finally:
            probe.unlink(missing_ok=True)
    except OSError as e:
        raise _cannot_write_into(folder, e) from None


def _cannot_write_into(folder: Path, e: OSError) -> WriteError:
    reason, no_room = e.strerror or str(e), e.errno in NO_ROOM
    todo = "Free some space" if no_room else "Make it writable, or choose another folder"
    return WriteError(f"cannot write into {folder} ({reason}); nothing was changed. {todo}", folder, reason, no_room)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
