"""How sftdpo writes and identifies what it keeps on disk: atomic writes, hard links, stable hashes,
and the one-writer-per-directory lock. Every file sftdpo writes goes through here.

Atomic: a file (or directory) is written under a temporary name in the same directory and renamed
into place, so a reader, a crash or `kill -9` sees the old version or the new one, never half of
one. Files that are written once and never changed in place (checkpoints) may be hard-linked.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import json
import os
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
    """Build a directory in a temporary sibling and put it in place of `path` (whatever was there)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def atomic_dir(final: Path, build: Callable[[Path], None]) -> Path:
    """Build a directory once: in a temp sibling, renamed into place, so concurrent or killed builders
    never leave a half-written directory that a later reader would trust. Returns `final`."""
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp", dir=final.parent))
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
