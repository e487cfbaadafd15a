"""Non-finite state is never committed: a step whose loss is finite but whose gradients are NaN stops the run with
exit 3 before its checkpoint, and the relaunch the message recommends resumes the last finite weights.

Oracles: the model-states file DeepSpeed itself wrote for the last good step (read with torch's weights-only
loader, not with the project's export code), and torch.isfinite.
"""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from engine.checkpoint.commit import MANIFEST, damage_of
from tests.launcher.reliability_runs import clean_env, finish, run_args, snapshot, start, weights

NAN_AT = 4
"""The NaN gradient comes in the step that would be saved (save_interval=2): the save must not happen."""


def deepspeed_weights(folder) -> dict[str, torch.Tensor]:
    """ZeRO-0 in fp32: the module's weights as DeepSpeed wrote them (its `module` entry)."""
    return torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]


@pytest.mark.slow
def test_nan_gradients_with_a_finite_loss_are_never_committed(tmp_path, data_cache):
    zero0 = "training.zero_stage=0"  # the case where DeepSpeed reports no gradient norm
    code, out, err = finish(start(run_args(data_cache, zero0), cwd=tmp_path,
                                  env=clean_env(RAG_TEST_NAN_GRAD_AT=str(NAN_AT))))
    assert code == 3, out[-2000:] + err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    match = re.search(rf"error: step {NAN_AT}: the training loss is (\S+) and the gradient norm nan", errors[0])
    assert match and math.isfinite(float(match.group(1))), errors[0]  # the loss alone would have let it through
    assert "the newest checkpoint is ./checkpoints/checkpoint_step_2" in errors[0]
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.glob("checkpoint_step_*")) == ["checkpoint_step_2"]
    assert damage_of(root / "checkpoint_step_2") is None and not list(root.glob(".tmp-*"))
    assert (root / "latest").read_text().strip() == "checkpoint_step_2"
    good = deepspeed_weights(root / "checkpoint_step_2")
    assert all(torch.isfinite(t).all() for t in good.values())

    # The relaunch it recommends, stopped at step 2 so that nothing trains: the exported weights are the resumed ones.
    code, out, err = finish(start(run_args(data_cache, zero0, max_steps=2), cwd=tmp_path, env=clean_env()))
    assert code == 0, out[-2000:] + err[-3000:]
    assert "resumed from ./checkpoints/checkpoint_step_2 at step 2" in out + err
    resumed = weights(root / "final_model.pt")
    assert resumed.keys() >= good.keys()
    for name, tensor in good.items():
        assert torch.isfinite(resumed[name]).all() and torch.equal(resumed[name], tensor), name


@pytest.mark.slow
def test_a_committed_checkpoint_with_nan_weights_is_set_aside_on_resume(tmp_path, data_cache):
    """A NaN checkpoint written before these checks existed: the resume moves it aside (kept byte for byte) and
    continues from the one before, instead of stopping with exit 3 at every relaunch."""
    zero0 = "training.zero_stage=0"
    code, out, err = finish(start(run_args(data_cache, zero0, max_steps=4), cwd=tmp_path, env=clean_env()))
    assert code == 0, err[-3000:]
    root = tmp_path / "checkpoints"
    bad = root / "checkpoint_step_4"
    states = torch.load(bad / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    name = "layers.0.attn.wq.weight"  # not the embedding: the tied output weight would load over it
    states["module"][name] = torch.full_like(states["module"][name], math.nan)
    torch.save(states, bad / "mp_rank_00_model_states.pt")
    manifest = json.loads((bad / MANIFEST).read_text())
    manifest["files"]["mp_rank_00_model_states.pt"] = (bad / "mp_rank_00_model_states.pt").stat().st_size
    (bad / MANIFEST).write_text(json.dumps(manifest))
    poisoned = snapshot(bad)

    code, out, err = finish(start(run_args(data_cache, zero0, max_steps=4), cwd=tmp_path, env=clean_env()))
    assert code == 0, out[-2000:] + err[-3000:]
    assert "checkpoints/checkpoint_step_4 cannot be resumed from (its weights hold NaN or inf)" in err, out[-3000:]
    assert "resumed from ./checkpoints/checkpoint_step_2 at step 2" in out + err
    (aside,) = root.glob("checkpoint_step_4.damaged-*")
    assert snapshot(aside) == poisoned
    retrained = deepspeed_weights(bad)
    assert all(torch.isfinite(t).all() for t in retrained.values())
