"""data/output.py, the one writer, on its own: staging, publishing by rename, and the outputs it refuses. The
commands that use it are tested in tests/engine/test_checkpoint_trust.py. Oracle: the bytes on disk before and after."""
from __future__ import annotations

import pytest

from data.errors import OutputError
from data.output import check_output, is_checkpoint_folder, leftovers, name_matcher, staged_output


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_file_is_published_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out" / "model.pt"
    with staged_output(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".model.pt.partial-") and tmp.suffix == ".pt"
        tmp.write_bytes(b"first")
    assert target.read_bytes() == b"first"
    with pytest.raises(OutputError, match="already exists: pass --overwrite"):
        with staged_output(target) as tmp:
            raise AssertionError("never reached: refused before anything is written")
    with pytest.raises(RuntimeError):
        with staged_output(target, overwrite=True) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("the disk is full")
    assert target.read_bytes() == b"first" and sorted(p.name for p in target.parent.iterdir()) == ["model.pt"]
    with staged_output(target, overwrite=True) as tmp:
        tmp.write_bytes(b"second")
    assert target.read_bytes() == b"second" and not leftovers(target.parent, "model.pt")


def test_a_folder_is_replaced_only_when_it_holds_nothing_but_the_commands_files(tmp_path):
    owned = name_matcher(r"model\.safetensors", r"model_config\.json")
    target = tmp_path / "st"
    for content in (b"one", b"two"):
        with staged_output(target, folder=True, owned=owned, overwrite=True) as tmp:
            (tmp / "model.safetensors").write_bytes(content)
            (tmp / "model_config.json").write_text("{}")
        assert (target / "model.safetensors").read_bytes() == content
    (target / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(OutputError, match=r"holds files this command did not write \(notes.txt\)"):
        with staged_output(target, folder=True, owned=owned, overwrite=True):
            pass
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["st"]


def test_checkpoints_and_inputs_are_never_outputs(tmp_path):
    root = tmp_path / "ckpt"
    (root / "checkpoint_step_2").mkdir(parents=True)
    (root / "latest").write_text("checkpoint_step_2")
    (tmp_path / "deepspeed_only").mkdir()
    (tmp_path / "deepspeed_only" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    assert is_checkpoint_folder(root) and is_checkpoint_folder(root / "checkpoint_step_2")
    assert is_checkpoint_folder(tmp_path / "deepspeed_only") and not is_checkpoint_folder(tmp_path)
    data = tmp_path / "corpus"
    data.mkdir()
    cases = {root: "is the checkpoint folder", root / "checkpoint_step_2": "is the checkpoint folder",
             root / "new.pt": "lies inside the checkpoint folder", tmp_path: "contains (the checkpoint folder|this command)",
             data: "is this command's input", data / "out": "lies inside this command's input"}
    for path, message in cases.items():
        with pytest.raises(OutputError, match=message):
            check_output(path, overwrite=True, inputs=[data], folder=path.suffix != ".pt")
    with pytest.raises(OutputError, match="contains the checkpoint folder"):
        check_output(tmp_path, overwrite=True, folder=True)
    check_output(root / "final_model.pt", overwrite=True, inside_checkpoint_ok=True)  # the trainer's own export
    with pytest.raises(OutputError, match="is a folder, not the file"):
        check_output(data, overwrite=True)
