"""Initialising parameters that DeepSpeed ZeRO-3 may have partitioned while the model was being built."""
from __future__ import annotations

import contextlib
from collections.abc import Iterable

from torch import nn


def gathered_for_init(params: nn.Parameter | Iterable[nn.Parameter]) -> contextlib.AbstractContextManager:
    """Whole-tensor access to parameters for initialisation.

    Under deepspeed.zero.Init (ZeRO-3) each module's parameters are partitioned as soon as it is built, so an
    in-place init would write an empty shard; gathering with modifier_rank=0 writes rank 0's values and
    broadcasts them (DeepSpeed docs, "Modifying Partitioned Parameters"). Outside ZeRO-3 this does nothing, and
    DeepSpeed is imported only when it built the parameters.
    """
    params = [params] if isinstance(params, nn.Parameter) else list(params)
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)
