"""The one writer: every output of every command is staged under a temporary name beside its target and published
by rename, and nothing the command did not create is deleted or replaced.

Rules (checked by `check_output` before anything is written, and again just before the rename):
- an existing output is refused unless the command was given --overwrite;
- even with --overwrite, an output that is, contains or lies inside a checkpoint folder, or that is, contains or
  lies inside the command's own input, is refused; so is an existing folder holding files the command would not
  have written (`owned`), since replacing the folder would delete them;
- the staged copy has a unique name (`.<name>.partial-<pid>-<random><suffix>`), so a staging area is never one the command
  did not create; a failure removes it and leaves an earlier output as it was.

It lives in data/ because the shard sets (data/preprocess.py) are outputs too and data/ may not import engine/;
engine/ and tools/ reuse it. The trainer's own checkpoints are staged by engine/checkpoint/commit.py (a folder
that all ranks write into), its exports (`final_model.pt`, `best_model.pt`) here.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from data.errors import OutputError

CHECKPOINT_FOLDER = re.compile(r"^(?:\.tmp-)?checkpoint_step_\d+(?:\.damaged-\d+)?$")
"""The names engine/checkpoint/commit.py gives checkpoint folders (committed, being written, set aside)."""
CHECKPOINT_FILES = ("latest", "checkpoint_complete.json")
"""Files only a checkpoint dir (`latest`, DeepSpeed's and ours) or a committed checkpoint (the manifest) holds."""
MAX_ENTRIES_SCANNED = 100_000
"""A folder is searched this far for a checkpoint inside it before the output is refused as too large to check."""

Owned = Callable[[str], bool]
"""Whether a file name inside an existing output folder is one the command writes there."""


def is_checkpoint_folder(path: Path) -> bool:
    """A checkpoint dir or a checkpoint_step_N folder (ours or DeepSpeed's: `*model_states.pt`)."""
    if not path.is_dir():
        return False
    if CHECKPOINT_FOLDER.match(path.name) or any((path / name).is_file() for name in CHECKPOINT_FILES):
        return True
    return any(path.glob("*model_states.pt"))


def _checkpoint_around(path: Path) -> Path | None:
    for candidate in (path, *path.parents):
        if is_checkpoint_folder(candidate):
            return candidate
    return None


def _checkpoint_within(path: Path) -> Path | None:
    if not path.is_dir():
        return None
    count = 0
    for root, dirs, _ in os.walk(path):
        for name in dirs:
            count += 1
            if is_checkpoint_folder(Path(root) / name):
                return Path(root) / name
        if count > MAX_ENTRIES_SCANNED:
            raise OutputError(f"{path} holds more than {MAX_ENTRIES_SCANNED:,} folders: too many to make sure none "
                              "is a checkpoint; choose a new output path")
    return None


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def check_output(path: str | Path, *, overwrite: bool, inputs: Iterable[str | Path] = (), owned: Owned | None = None,
                 folder: bool = False, inside_checkpoint_ok: bool = False, what: str = "--output") -> None:
    """OutputError (one line naming the path and the fix) unless `path` may be written (see the module rules)."""
    path = Path(path)
    real = _real(path)
    for source in inputs:
        src = _real(Path(source))
        if real == src or src in real.parents or real in src.parents:
            relation = "is" if real == src else "lies inside" if src in real.parents else "contains"
            raise OutputError(f"{what} {path} {relation} this command's input {source}: choose an output path "
                              "outside it")
    if not inside_checkpoint_ok:
        around = _checkpoint_around(real)
        if around is not None:
            relation = "is" if around == real else "lies inside"
            raise OutputError(f"{what} {path} {relation} the checkpoint folder {around}: checkpoints are never "
                              "written into by other commands; choose an output path outside it")
        within = _checkpoint_within(real)
        if within is not None:
            raise OutputError(f"{what} {path} contains the checkpoint folder {within}: choose an output path "
                              "that holds no checkpoint")
    if not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        raise OutputError(f"{what} {path} already exists: pass --overwrite to replace it, or choose another path")
    if path.is_symlink() or path.is_dir() != folder:
        kind = "a symbolic link" if path.is_symlink() else "a folder" if path.is_dir() else "a file"
        raise OutputError(f"{what} {path} is {kind}, not the {'folder' if folder else 'file'} this command writes: "
                          "it is not replaced; choose another path")
    if folder:
        foreign = sorted(p.name for p in path.iterdir() if owned is None or not owned(p.name))
        if foreign:
            raise OutputError(f"{what} {path} holds files this command did not write ({', '.join(foreign[:3])}"
                              f"{', ...' if len(foreign) > 3 else ''}): replacing it would delete them; choose "
                              "another path")


def _fsync_tree(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())


def remove(path: Path) -> None:
    """Remove a staged file or folder this module created."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def staging_name(path: Path) -> Path:
    """A new hidden sibling name; it keeps the suffix, which some writers read the format from (savefig)."""
    return path.with_name(f".{path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")


def publish(staged: Path, path: Path, *, overwrite: bool, folder: bool, owned: Owned | None = None,
            inputs: Iterable[str | Path] = (), inside_checkpoint_ok: bool = False, what: str = "--output") -> None:
    """Rename `staged` to `path` after checking the rules once more (something may have appeared meanwhile). An
    existing folder output is renamed aside first and removed only once the new one is in place."""
    inputs = list(inputs)
    check_output(path, overwrite=overwrite, inputs=inputs, owned=owned, folder=folder,
                 inside_checkpoint_ok=inside_checkpoint_ok, what=what)
    _fsync_tree(staged)
    if folder and path.is_dir():
        aside = path.with_name(f".{path.name}.replaced-{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(path, aside)
        os.rename(staged, path)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(staged, path)


@contextmanager
def staged_output(path: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path] = (),
                  owned: Owned | None = None, folder: bool = False, inside_checkpoint_ok: bool = False,
                  what: str = "--output") -> Iterator[Path]:
    """Yield a new temporary sibling of `path` (an empty folder when `folder`) to write into; on success it is
    published under `path`, on failure removed. OutputError before anything is written if `path` may not be."""
    path = Path(path)
    inputs = list(inputs)
    rules = dict(overwrite=overwrite, inputs=inputs, owned=owned, folder=folder,
                 inside_checkpoint_ok=inside_checkpoint_ok, what=what)
    check_output(path, **rules)
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = staging_name(path)
    if folder:
        staged.mkdir()
    try:
        yield staged
        publish(staged, path, **rules)
    except BaseException:
        remove(staged)
        raise


def leftovers(folder: Path, name: str) -> list[Path]:
    """Staged copies of `name` in `folder` left by a killed process of the same command (to remove on restart)."""
    return sorted(folder.glob(f".{name}.partial-*"))


def name_matcher(*patterns: str) -> Owned:
    """An `owned` predicate from regular expressions (full match)."""
    compiled = [re.compile(p) for p in patterns]
    return lambda name: any(c.fullmatch(name) for c in compiled)
