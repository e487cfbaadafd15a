"""The engine's user-facing errors: problems a user can fix (a checkpoint folder, a resume that does not match,
storage). Their messages name the file or key and what to do; the launcher prints them and exits 2."""
from __future__ import annotations

import errno
import resource
import shutil
from pathlib import Path


START_OVER = ("set training.checkpoint_dir to a new folder to start over (training.resume=false alone is refused "
              "while the folder holds checkpoints)")
"""The advice that works for starting afresh: a run refuses to mix with an earlier run's checkpoints."""


class TrainingError(RuntimeError):
    """A training problem the user can fix; the message names the file or key and the fix."""


class CheckpointError(TrainingError):
    """A checkpoint folder that cannot be written, read or resumed from."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file whose pickle names code other than the types DeepSpeed writes: never loaded."""


class NonFiniteError(TrainingError):
    """The loss or gradient norm became NaN or infinite; the run stops before saving or exporting anything."""


# What torch's zip writer (caffe2/serialize/inline_container.cc) raises, as RuntimeError without an errno, when the
# kernel refuses a write: seen with `ulimit -f` and SIGXFSZ ignored (EFBIG): "[enforce fail at
# inline_container.cc:672] . unexpected pos 704 vs 598", its context "basic_ios::clear: iostream error"; the
# other texts are the writer's own checks for a short write.
_TORCH_WRITE_FAILURES = ("PytorchStreamWriter failed", "unexpected pos", "file write failed", "iostream error")
STORAGE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO}


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def is_storage_failure(err: BaseException) -> bool:
    """Whether `err` is the storage refusing a write, whatever type torch or DeepSpeed gave it: an OSError (any
    errno: the caller is writing), or torch's RuntimeError for a short write, anywhere in the exception chain."""
    for link in _chain(err):
        if isinstance(link, OSError):
            return True
        if isinstance(link, RuntimeError) and any(text in str(link) for text in _TORCH_WRITE_FAILURES):
            return True
    return False


def storage_hint(path: str | Path, err: BaseException) -> str:
    """The likely cause of a failed write to `path` and what to do. torch's RuntimeError has no errno, so the
    cause is read from the machine: the free space on that disk and this process's file-size limit."""
    code = next((link.errno for link in _chain(err) if isinstance(link, OSError) and link.errno), None)
    if code == errno.ENOSPC:
        return "the disk is full: free space"
    if code == errno.EDQUOT:
        return "the disk quota is used up: free space"
    if code == errno.EROFS:
        return "the file system is read-only: choose a writable folder"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied: make it writable or choose another folder"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if code == errno.EFBIG or limit != resource.RLIM_INFINITY:
        shown = "unlimited" if limit == resource.RLIM_INFINITY else f"{limit:,} bytes"
        return (f"the file is larger than this process may write (file-size limit `ulimit -f`: {shown}, or the file "
                "system's maximum): raise the limit or write to another disk")
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if free is not None and free < 64 * 2**20:
        return f"the disk is (nearly) full ({free / 2**20:,.1f} MiB free): free space or write to another disk"
    return "the storage refused the write: check the disk (free space, quota, errors) or write to another disk"


def first_line(err: BaseException) -> str:
    """An exception's message without C++ backtraces (torch appends them after the first line)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
