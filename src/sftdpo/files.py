"""How sftdpo writes, reads back and identifies what it keeps on disk: atomic writes, hard links,
the readers of its own JSON files, stable hashes, and the one-writer-per-directory lock. Every file
sftdpo writes goes through here.

Atomic: a file (or directory) is written under a temporary name in the same directory and renamed
into place, so a reader, a crash or `kill -9` sees the old version or the new one, never half of
one. Files that are written once and never changed in place (checkpoints) may be hard-linked.

Read back: a file sftdpo wrote earlier can still be damaged (a full disk, a copy cut short, an
editor): its reader raises `DamagedFile`, one line naming the file and what to do, and the caller
repairs what can be repaired from the truth (a cache entry recomputed, an index rebuilt, a run's
end redone). A write that fails (a full disk, a file-size limit, a read-only directory) is one
line too (`write_failure`), and leaves the previous version in place.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import hashlib
import itertools
import json
import os
import re
import shutil
import tempfile
from array import array
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .errors import SftdpoError


# -- atomic writes -----------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of `path` to write to; renamed onto `path` when the block ends without
    an error, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is None:  # a write that failed (a full disk): name the file it was for
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def copy_atomic(src: str | Path, dst: str | Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def replace_dir(path: str | Path, build: Callable[[Path], None]) -> None:
    """Build a directory in a temporary sibling and put it in place of `path` (whatever was there):
    swapped in one step where the kernel can (Linux renameat2 RENAME_EXCHANGE), so a crash at any
    moment leaves the old directory or the new one. A build that fails leaves `path` as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists() and _exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old directory
        return
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the C library or the file system cannot."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def replace_files(out_dir: str | Path, build: Callable[[Path], None], stale: Callable[[str], bool]) -> list[Path]:
    """Write a set of files into `out_dir` so that the old set stays until the new one is complete:
    `build` writes them into a temporary directory inside `out_dir`; then each is renamed over its old
    version and the old files `stale(name)` selects that the new set lacks are removed. A build that
    fails (a full disk) leaves `out_dir` as it was. Returns the new files' paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_orphans(out_dir, ".new")
    tmp = Path(tempfile.mkdtemp(prefix=f".new{os.getpid()}-", dir=out_dir))
    try:
        build(tmp)
        names = sorted(p.name for p in tmp.iterdir() if p.is_file())
        for name in names:
            os.replace(tmp / name, out_dir / name)
        for p in out_dir.iterdir():
            if p.is_file() and p.name not in names and stale(p.name):
                p.unlink()
        return [out_dir / n for n in names]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_orphans(parent: Path, prefix: str) -> None:
    """Remove the temporary directories `<prefix><pid>-*` in `parent` whose process is gone (killed
    while it wrote: a converted model or a checkpoint would otherwise stay on disk for good)."""
    for old in parent.glob(f"{glob.escape(prefix)}*-*"):
        pid = old.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists (a zombie, ended but not yet reaped, counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def writable(path: str | Path) -> bool:
    """Whether this process can create and replace files in directory `path` (it need not exist yet:
    then its first existing ancestor)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return p.is_dir() and os.access(p, os.W_OK | os.X_OK)


# errno values a write meets on a full, limited or read-only disk
_WRITE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                 errno.EFBIG: "the file exceeds the file-size limit", errno.EROFS: "the file system is read-only",
                 errno.EACCES: "permission denied", errno.EPERM: "permission denied"}


def as_os_error(e: Exception, path: str | Path) -> Exception:
    """The OSError that a library's own error wraps (safetensors: "... I/O error: File too large (os
    error 27)"), for `path`; else `e` itself. So a full disk under safetensors reads as one too."""
    m = re.search(r"\(os error (\d+)\)", str(e))
    return OSError(int(m.group(1)), os.strerror(int(m.group(1))), str(path)) if m else e


def is_write_failure(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in _WRITE_ERRNOS


def write_failure(e: OSError, what: str, then: str = "") -> SftdpoError:
    """One line for a write that failed for lack of room or permission: what could not be written,
    why, and what to do (`then`: what the user will find afterwards, e.g. the earlier checkpoint)."""
    why = _WRITE_ERRNOS.get(e.errno or 0, e.strerror or type(e).__name__)
    where = f" ({e.filename})" if e.filename else ""
    fix = ("free disk space (or raise the limit) and run the same command again" if e.errno not in
           (errno.EROFS, errno.EACCES, errno.EPERM) else "use a directory you can write to")
    return SftdpoError(f"could not write {what}{where}: {why}; {fix}" + (f" ({then})" if then else ""))


# -- reading back what sftdpo wrote ------------------------------------------------------------

class DamagedFile(SftdpoError):
    """A file sftdpo wrote earlier cannot be read back (truncated, garbage, cut short by a full disk)."""

    def __init__(self, path: str | Path, why: str, fix: str) -> None:
        super().__init__(f"{path} is damaged ({why}): {fix}")
        self.path, self.why, self.fix = Path(path), why, fix


# what happens to a run whose own files (checkpoint, metrics, DPO stage inputs) are damaged: the training
# loop starts it again, which gives the same result (the files of a run directory are its only truth)
RUN_RESTARTS = "the run starts again from its beginning"


def read_json(path: str | Path, fix: str) -> Any:
    """The JSON value in `path`, or DamagedFile (with `fix`, what to do) when it is not one.
    A missing file raises FileNotFoundError: whether that is damage depends on the caller."""
    data = Path(path).read_bytes()
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DamagedFile(path, f"not UTF-8 at byte {e.start}", fix) from None
    except json.JSONDecodeError as e:
        why = "empty" if not data.strip() else f"{e.msg} at line {e.lineno}, column {e.colno}"
        raise DamagedFile(path, why, fix) from None


def read_jsonl(path: str | Path, fix: str, torn_ok: bool = True) -> list[dict]:
    """The records of a JSON Lines file. In a file sftdpo appends to (`torn_ok`), a last line that does
    not parse is one cut short by a crash or a full disk (the writer appends whole lines): it is
    dropped, as `train` drops it on resume. Any other bad line raises DamagedFile naming the line."""
    lines = Path(path).read_bytes().splitlines()
    out: list[dict] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if torn_ok and n == len(lines):
                break  # a torn last line
            raise DamagedFile(path, f"line {n} is not JSON ({type(e).__name__})", fix) from None
        if not isinstance(rec, dict):
            raise DamagedFile(path, f"line {n} is not a JSON object", fix)
        out.append(rec)
    return out


def atomic_dir(final: Path, build: Callable[[Path], None]) -> Path:
    """Build a directory once: in a temp sibling, renamed into place, so concurrent or killed builders
    never leave a half-written directory that a later reader would trust. Returns `final`."""
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(final.parent, final.name + ".tmp")
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp{os.getpid()}-", dir=final.parent))
    try:
        build(tmp)
        with contextlib.suppress(OSError):  # another process won the race: keep its copy
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def link_file(src: str | Path, dst: str | Path) -> None:
    """A hard link where the file system allows, else a copy. Only for files that are written once
    and never changed in place: a shared SFT prefix or a best checkpoint that is also the last then
    costs no copy (an FFT checkpoint is 0.5-1.6 GB)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def link_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, copy_function=link_file)


# -- hashes ------------------------------------------------------------------------------------

def stable_hash(obj: Any, length: int = 12) -> str:
    """Hex digest of `obj` as canonical JSON (sorted keys), the same in every process and version."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def hash_tensors(items: Sequence[tuple[str, Any]], length: int = 20) -> str:
    """Digest of named torch tensors (name, shape, dtype and values), independent of their order.
    (Duck-typed on purpose: this module stays importable without torch, for the CLI and the study driver.)"""
    h = hashlib.sha256()
    for name, t in sorted(items, key=lambda x: x[0]):
        data = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(data.shape)}|{data.dtype}|".encode())
        if str(data.dtype) == "torch.bfloat16":  # numpy has no bf16; widening to fp32 is exact and one-to-one
            data = data.float()
        h.update(data.numpy().tobytes())
    return h.hexdigest()[:length]


def hash_id_lists(*lists: Sequence[Sequence[int]], length: int = 20) -> str:
    """Digest of lists of token-id sequences (lengths included, so boundaries count)."""
    h = hashlib.sha256()
    for seqs in lists:
        h.update(array("q", map(len, seqs)).tobytes())
        h.update(array("q", itertools.chain.from_iterable(seqs)).tobytes())
    return h.hexdigest()[:length]


# -- one writer per directory ------------------------------------------------------------------

def ensure_dir(path: str | Path, what: str = "--out") -> Path:
    """`path` as a writable directory (created if needed), or one clear error: a file there or above
    it, or no permission to write."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise SftdpoError(f"{what} {p} is a file, not a directory: give a directory path")
    above = next((q for q in p.parents if q.exists()), None)
    if above is not None and not above.is_dir():
        raise SftdpoError(f"{what} {p} is under {above}, which is a file: give a directory path")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SftdpoError(f"{what} {p} cannot be created ({e.strerror}): give a directory you can write to") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise SftdpoError(f"{what} {p} is not writable: give a directory you can write to")
    return p



LOCK_FILE = ".lock"


class DirectoryBusy(Exception):
    """Another live process holds the directory's lock."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is in use by {holder}")
        self.path, self.holder = path, holder


class DirLock:
    """An exclusive lock on a directory: `flock` on `<dir>/.lock`, which holds the owner's pid and
    command. The kernel drops the lock when its process dies (kill -9 included), so a lock left by
    a dead process is simply taken over; a lock held by a live one raises DirectoryBusy."""

    def __init__(self, directory: str | Path, what: str = "") -> None:
        self.dir = Path(directory)
        self.what = what
        self.fd: int | None = None

    def acquire(self) -> "DirLock":
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise DirectoryBusy(self.dir, lock_holder(self.dir) or "another process") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "what": self.what}).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_holder(directory: str | Path) -> str | None:
    """'process PID (what)' of a live holder of `directory`'s lock, else None."""
    path = Path(directory) / LOCK_FILE
    if not path.exists():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:  # held: read who holds it
            try:
                info = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                info = {}
            what = f" ({info['what']})" if info.get("what") else ""
            return f"process {info.get('pid', '?')}{what}"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
