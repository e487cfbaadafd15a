"""Crash-consistent DeepSpeed checkpoints: written under a temporary tag, verified, then published by rename.

A checkpoint folder `checkpoint_step_N` exists under its final name only once every file in it is complete:
  1. every rank's DeepSpeed save goes into `.tmp-checkpoint_step_N` (save_latest=False);
  2. rank 0 checks each `.pt` opens as a complete zip archive, writes the self-describing JSON files and a
     manifest (`checkpoint_complete.json`: every file and its size), fsyncs them;
  3. renames the folder to `checkpoint_step_N` (atomic within one file system), then replaces `latest`
     atomically (temporary file + os.replace), then prunes.
A kill at any point leaves either no `checkpoint_step_N` or a complete one. A committed folder is never written
again (a relaunch at max_steps does not re-save it). Loading takes the newest folder whose manifest matches its
files and whose pickles pass the weights-only check (engine/checkpoint/safe_load.py); a damaged newest one is reported and
the previous complete one is used. Pruning deletes only committed folders of this checkpoint_dir, never the one
the run resumed from.

Across nodes. On a shared file system the ranks of every node write their files into the one temporary folder;
each fsyncs what it wrote before DeepSpeed's closing barrier, so rank 0 publishes only files that are complete on
disk whichever node wrote them. With node-local disks (`node_local=True`, DeepSpeed's
`checkpoint.use_node_local_storage`: each node's local rank 0 writes the model states, every rank its optimizer
partition) the first rank of each node runs steps 2-3 on its own folder, and a step counts as committed only when
it is committed on every node: pruning waits until all nodes have published, and loading takes the newest step
complete on all of them. A node killed mid-save therefore leaves at worst a step that one node has and another
lacks; the run resumes from the step before it on every node and replaces that node's copy when it saves again.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

from engine import distributed
from engine.checkpoint import universal
from engine.errors import CheckpointError, UnsafeCheckpointError, first_line, is_storage_failure, storage_hint
from engine.faults import kill_point, wrap_deepspeed_saves
from engine.checkpoint.safe_load import check_tree, load_deepspeed_checkpoint, tag_folder

TAG_PATTERN = re.compile(r"^checkpoint_step_(\d+)$")
MANIFEST = "checkpoint_complete.json"
TEMP_PREFIX = ".tmp-"
FREE_SPACE_MARGIN = 1.05
"""Free disk must exceed the estimated bytes of a save by 5% (file-system metadata, the JSON files)."""


def checkpoint_tag(step: int) -> str:
    return f"checkpoint_step_{step}"


def list_checkpoint_tags(checkpoint_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoint_step_N` folder, oldest first."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := TAG_PATTERN.match(p.name))]
    return sorted(found)


def latest_tag(checkpoint_dir: str | Path) -> str | None:
    """The tag DeepSpeed's `latest` file points to, if it exists and its folder is there. A tag naming anything
    but a folder directly inside checkpoint_dir is a CheckpointError (engine/checkpoint/safe_load.py tag_folder)."""
    latest = Path(checkpoint_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if tag_folder(checkpoint_dir, tag, source=str(latest)).is_dir() else None


def damage_of(folder: Path) -> str | None:
    """Why `folder` is not a complete committed checkpoint, or None when its manifest matches its files."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as err:
        return f"no readable {MANIFEST} ({type(err).__name__})"
    for name, size in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
    return None


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)


def storage_error(err: BaseException, path: Path) -> CheckpointError:
    """A failed write of a checkpoint (an OSError, or torch's RuntimeError for the same kernel error), as one
    message naming the path and what to do."""
    fix = {errno.ENOTDIR: "a file stands where a folder is needed: move it away",
           errno.EEXIST: "a file stands where a folder is needed: move it away"}
    code = getattr(err, "errno", None)
    hint = fix.get(code) or storage_hint(path, err)
    where = getattr(err, "filename", None) or path
    reason = (err.strerror if isinstance(err, OSError) and err.strerror else first_line(err))
    return CheckpointError(f"cannot write {where}: {reason}; {hint}, or set training.checkpoint_dir elsewhere "
                           "(nothing of this save was kept; earlier checkpoints are intact)")


class CheckpointCommitter:
    """Commit, find, verify and prune `checkpoint_step_N` folders (see the module docstring)."""

    def __init__(self, checkpoint_dir: str | Path, *, keep_last: int, run_record: dict[str, Any],
                 node_local: bool = False):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.keep_last = keep_last
        self.run_record = run_record
        self.node_local = node_local
        """Each node keeps its own part of every checkpoint on its own disk (module docstring, 'Across nodes')."""
        self.resumed_tag: str | None = None
        """The folder this run resumed from: never pruned."""

    def _on_writers(self, fn):
        """Run fn where checkpoint folders are managed: rank 0, or with node-local disks the first rank of every
        node; an error is raised on every rank. Returns rank 0's result."""
        if self.node_local:
            return distributed.run_on_node_leaders(fn)[0]
        return distributed.run_on_main(fn)

    # ---- before training ---------------------------------------------------------------------------------------
    def prepare(self, *, resume: bool) -> None:
        """The folder is a writable directory; a fresh run does not mix with an earlier run's checkpoints; the
        temporary leftovers of a killed save are removed. All ranks call; rank 0 (with node-local disks the first
        rank of each node) checks and reports for all."""
        self._on_writers(lambda: self._prepare(resume))

    def _prepare(self, resume: bool) -> None:
        root = self.checkpoint_dir
        if root.exists() and not root.is_dir():
            raise CheckpointError(f"training.checkpoint_dir {root} is a file, not a folder: move the file away or "
                                  "set training.checkpoint_dir to a folder")
        probe = root / f"{TEMP_PREFIX}write-probe-{os.getpid()}"
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as err:
            raise storage_error(err, root) from err
        existing = list_checkpoint_tags(root)
        if not resume and existing:
            # Refused rather than mixed: the folder's `latest`, exports and pruning would otherwise serve two
            # runs at once (the old behaviour deleted the new run's checkpoints and kept the old run's).
            raise CheckpointError(
                f"training.resume is false but training.checkpoint_dir {root} holds checkpoints of an earlier run "
                f"({', '.join(p.name for _, p in existing[-3:])}): set training.checkpoint_dir to a new folder, "
                "or move the old one away, or set training.resume=true to continue it")
        for leftover in root.glob(f"{TEMP_PREFIX}*"):  # a save killed before it was published
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        for leftover in [*root.glob(".*.pt.tmp"), *root.glob(".*.pt.partial-*")]:  # an export killed before its rename
            leftover.unlink(missing_ok=True)

    # ---- saving ------------------------------------------------------------------------------------------------
    def save(self, engine, step: int, client_state: dict[str, Any]) -> Path:
        """Commit a resumable checkpoint of `step` (all ranks call this), then prune old ones."""
        tag = checkpoint_tag(step)
        folder = self.checkpoint_dir / tag
        if distributed.all_agree(folder.is_dir() and damage_of(folder) is None):
            return folder  # committed before, on every node (a relaunch at max_steps): never rewritten in place
        temp_tag = TEMP_PREFIX + tag
        self._on_writers(lambda: shutil.rmtree(self.checkpoint_dir / temp_tag, ignore_errors=True))
        self.ensure_free_space(self._bytes_needed(engine), what=str(folder), on_writers=True)
        fsync_deepspeed_saves(engine)
        wrap_deepspeed_saves(engine)
        try:
            engine.save_checkpoint(str(self.checkpoint_dir), tag=temp_tag, client_state=client_state,
                                   save_latest=False)
        except Exception as err:
            shutil.rmtree(self.checkpoint_dir / temp_tag, ignore_errors=True)
            if is_storage_failure(err):  # torch reports ENOSPC/EFBIG as RuntimeError, not OSError
                raise storage_error(err, folder) from err
            raise
        self._on_writers(lambda: self._publish(self.checkpoint_dir / temp_tag, folder, step))
        # Only once every writer has published: a node that pruned before another node's commit could delete the
        # last step that both nodes hold.
        self._on_writers(lambda: self._prune(keep=folder.name))
        return folder

    def _publish(self, temp: Path, folder: Path, step: int) -> None:
        try:
            self._describe(temp)
            files = {}
            for path in sorted(p for p in temp.rglob("*") if p.is_file()):
                if path.suffix == ".pt":
                    with zipfile.ZipFile(path) as archive:  # reads the central directory: a cut file fails here
                        archive.infolist()
                _fsync(path)
                files[str(path.relative_to(temp))] = path.stat().st_size
            manifest = {"step": step, "files": files, "saved_at": time.time(), "world_size": distributed.world_size(),
                        "node_local": self.node_local}
            _write_atomically(temp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            kill_point("checkpoint.publish")
            if folder.exists() and damage_of(folder) is None:
                # Committed on this node only: another node died before committing the same step, and the run
                # resumed from the step before. This run wrote it; the new save replaces it.
                print(f"note: {folder} was committed on this node only (another node's save of it did not finish); "
                      "replacing it", file=sys.stderr)
                shutil.rmtree(folder)
            elif folder.exists():  # a damaged folder of the same step: kept aside, not overwritten
                aside = folder.with_name(f"{folder.name}.damaged-{int(time.time())}")
                print(f"warning: {folder} was incomplete ({damage_of(folder)}); moved to {aside}", file=sys.stderr)
                folder.rename(aside)
            temp.rename(folder)
            _fsync(self.checkpoint_dir)
            kill_point("checkpoint.latest")
            _write_atomically(self.checkpoint_dir / "latest", folder.name)
        except OSError as err:
            shutil.rmtree(temp, ignore_errors=True)
            raise storage_error(err, folder) from err
        except zipfile.BadZipFile as err:
            shutil.rmtree(temp, ignore_errors=True)
            raise CheckpointError(f"the checkpoint just written to {folder} is unreadable ({err}); check the disk "
                                  "and relaunch (the run resumes from the previous checkpoint)") from err

    def _describe(self, folder: Path) -> None:
        """Make the folder self-describing: the resolved run config, the ds_config and the code version."""
        for name, key in (("run_config.json", "run_config"), ("ds_config.json", "ds_config"),
                          ("version.json", "version")):
            if key in self.run_record:
                (folder / name).write_text(json.dumps(self.run_record[key], indent=2, sort_keys=True) + "\n")

    def _prune(self, keep: str) -> None:
        """Delete committed folders beyond keep_last, oldest first; never `keep`, the resumed-from folder, a
        damaged one or anything not named checkpoint_step_N."""
        protected = {keep, self.resumed_tag}
        committed = [(step, p) for step, p in list_checkpoint_tags(self.checkpoint_dir) if damage_of(p) is None]
        keep_step = int(TAG_PATTERN.match(keep).group(1))
        candidates = [p for step, p in committed if p.name not in protected and step < keep_step]
        num_more = max(0, self.keep_last - sum(1 for _, p in committed if p.name in protected))
        for folder in candidates[:max(0, len(candidates) - num_more)]:
            shutil.rmtree(folder, ignore_errors=True)

    # ---- free space --------------------------------------------------------------------------------------------
    def _bytes_needed(self, engine) -> int:
        """The size of the newest committed checkpoint, or an estimate from the parameters: weights in their
        training dtype, plus Adam's two fp32 moments, plus an fp32 master copy under bf16/fp16."""
        committed = [p for _, p in list_checkpoint_tags(self.checkpoint_dir) if damage_of(p) is None]
        if committed:
            return sum(json.loads((committed[-1] / MANIFEST).read_text())["files"].values())
        total = 0
        for param in engine.module.parameters():
            numel = getattr(param, "ds_numel", param.numel())
            element = param.element_size()
            total += numel * (element + 8 + (4 if element < 4 else 0))
        return total

    def ensure_free_space(self, num_bytes: int, *, what: str, on_writers: bool = False) -> None:
        """CheckpointError (on every rank) when the checkpoint disk has less than num_bytes (+5%) free: rank 0's,
        or with on_writers every disk a checkpoint is written to (node-local disks: each node's)."""
        def check() -> None:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.checkpoint_dir).free
            if free < num_bytes * FREE_SPACE_MARGIN:
                raise CheckpointError(
                    f"not enough free disk for {what}: it needs about {num_bytes / 2**20:,.1f} MiB, "
                    f"{self.checkpoint_dir} has {free / 2**20:,.1f} MiB free; free space or set "
                    "training.checkpoint_dir to a bigger disk (nothing was written, earlier checkpoints are kept)")
        self._on_writers(check) if on_writers else distributed.run_on_main(check)

    @contextlib.contextmanager
    def storage_errors(self, path: Path):
        """Turn a failed write (OSError, or torch's RuntimeError for one) into a CheckpointError naming `path`."""
        try:
            yield
        except Exception as err:
            if is_storage_failure(err):  # torch reports ENOSPC/EFBIG as RuntimeError, not OSError
                raise storage_error(err, path) from err
            raise

    def set_aside(self, tag: str, why: str) -> Path:
        """Rename a committed folder that must not be resumed from to `<tag>.damaged-<time>` (kept, never deleted;
        no longer a checkpoint_step_N, so neither loading nor pruning sees it). All ranks call; rank 0 renames."""
        folder = self.checkpoint_dir / tag
        aside = folder.with_name(f"{tag}.damaged-{int(time.time())}")

        def rename() -> None:
            print(f"warning: checkpoint {folder} cannot be resumed from ({why}); moved to {aside}", file=sys.stderr,
                  flush=True)
            folder.rename(aside)

        self._on_writers(rename)  # with node-local disks every node holds a part of it
        self.resumed_tag = None
        return aside

    # ---- loading -----------------------------------------------------------------------------------------------
    def load_latest(self, engine) -> dict[str, Any] | None:
        """Restore the newest complete checkpoint; returns its client state, or None if the folder has none.

        A damaged newest one is reported and skipped; one whose pickles name foreign code stops the run."""
        if self.node_local:
            return self._load_node_local(engine)
        candidates = list_checkpoint_tags(self.checkpoint_dir)[::-1]
        for step, folder in candidates:
            problem = distributed.run_on_main(lambda f=folder: self._check_loadable(f))
            if problem is not None:
                if distributed.is_main_process():
                    print(f"warning: checkpoint {folder} is damaged ({problem}); falling back to the previous "
                          "complete checkpoint", file=sys.stderr, flush=True)
                continue
            # A checkpoint saved by another number of ranks loads through DeepSpeed's universal checkpoint.
            other_size = universal.needs_universal(folder, distributed.world_size())
            return self._load(engine, folder, universal.load_universal if other_size else load_deepspeed_checkpoint)
        if candidates:
            raise CheckpointError(
                f"no complete checkpoint in {self.checkpoint_dir} (all of {', '.join(p.name for _, p in candidates)} "
                "are damaged): move the folder away, or set training.checkpoint_dir to a new folder, to start over")
        return None

    def _check_loadable(self, folder: Path) -> str | None:
        """Why folder cannot be resumed from (None: it can). Foreign code in a pickle raises, never falls back."""
        if (folder / MANIFEST).exists():
            problem = damage_of(folder)
            if problem is not None:
                return problem
        elif not any(folder.glob("*model_states.pt")):
            return "no model_states file"
        try:
            check_tree(folder)  # every pickle at any depth, the universal copy included
        except UnsafeCheckpointError:
            raise
        except CheckpointError as err:
            return str(err)
        return None

    # ---- node-local disks ----------------------------------------------------------------------------------------
    def _problems_here(self) -> dict[int, str | None]:
        """step -> why this node's folder of it cannot be resumed from (None: it can), newest first."""
        return {step: self._check_loadable(folder) for step, folder in list_checkpoint_tags(self.checkpoint_dir)[::-1]}

    def _load_node_local(self, engine) -> dict[str, Any] | None:
        """Restore the newest step that is complete on every node (each node reads its own disk)."""
        per_node = distributed.run_on_node_leaders(self._problems_here)
        steps = sorted({step for node in per_node for step in node}, reverse=True)
        for step in steps:
            missing = [f"node {i}: {node.get(step, 'no such folder')}" for i, node in enumerate(per_node)
                       if node.get(step, "no such folder") is not None]
            if not missing:
                break
            if distributed.is_main_process():
                print(f"warning: checkpoint_step_{step} is not complete on every node ({'; '.join(missing)}); "
                      "falling back to the previous step that is", file=sys.stderr, flush=True)
        else:
            if steps:
                raise CheckpointError(
                    f"no checkpoint in {self.checkpoint_dir} is complete on every node: move the folders away and set "
                    "training.resume=false to start over")
            return None
        folder = self.checkpoint_dir / checkpoint_tag(step)
        saved = json.loads((folder / MANIFEST).read_text()).get("world_size") if (folder / MANIFEST).exists() else None
        if saved is not None and saved != distributed.world_size():
            raise CheckpointError(
                f"{folder} was saved by {saved} ranks on node-local disks, this run has {distributed.world_size()}: "
                "copy every node's checkpoint_step_N into one folder on a shared file system (the nodes hold disjoint "
                "files), set checkpoint_dir to it and training.node_local_checkpoints=false; the resume then goes "
                "through DeepSpeed's universal checkpoint")
        return self._load(engine, folder, load_deepspeed_checkpoint)

    def _load(self, engine, folder: Path, loader) -> dict[str, Any]:
        """`loader(engine, checkpoint_dir, tag)` for `folder`, which becomes `resumed_tag`; returns the client state."""
        path, client_state = loader(engine, self.checkpoint_dir, folder.name)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {folder}: move it away to resume from the one "
                                  "before, or set training.checkpoint_dir to a new folder")
        self.resumed_tag = folder.name
        return client_state


def fsync_deepspeed_saves(engine) -> None:
    """Make every rank fsync each file DeepSpeed writes for it, before save_checkpoint's closing barrier: the rank
    that publishes (rank 0, perhaps on another node of a shared file system) can then trust that the files are on
    disk, not only in the writer's page cache. Wraps the checkpoint engine's save once."""
    checkpoint_engine = getattr(engine, "checkpoint_engine", None)  # None: a stand-in engine of a test
    if checkpoint_engine is None or getattr(checkpoint_engine, "_fsyncs_saves", False):
        return
    original = checkpoint_engine.save

    def save(state_dict, path):
        result = original(state_dict, path)
        if isinstance(path, (str, Path)) and Path(path).is_file():
            _fsync(Path(path))
        return result

    checkpoint_engine.save = save
    checkpoint_engine._fsyncs_saves = True
