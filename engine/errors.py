"""The engine's user-facing errors: problems a user can fix (a checkpoint folder, a resume that does not match,
storage). Their messages name the file or key and what to do; the launcher prints them and exits 2."""
from __future__ import annotations


class TrainingError(RuntimeError):
    """A training problem the user can fix; the message names the file or key and the fix."""


class CheckpointError(TrainingError):
    """A checkpoint folder that cannot be written, read or resumed from."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file whose pickle names code other than the types DeepSpeed writes: never loaded."""


class NonFiniteError(TrainingError):
    """The loss or gradient norm became NaN or infinite; the run stops before saving or exporting anything."""
