"""torchtitan override: every MoE layer of a torchtitan model becomes an spmd_moe MoE.

One flag on torchtitan's own launcher (torchtitan 0.3.0's ``--override.imports``, applied
by its Trainer after ``update_from_config`` and before the model is built)::

    torchrun --nproc_per_node 1 -m torchtitan.train --module qwen3 --config qwen3_moe_debug \\
        --override.imports spmd_moe.integrations.torchtitan.overrides.spmd_moe

Options of SpmdMoE.Config travel as the override's kwargs (a JSON object after ``=``)::

    --override.imports 'spmd_moe.integrations.torchtitan.overrides.spmd_moe={"expert_dtype": null}'

The replacement keeps every field of the torchtitan MoE.Config (``derive``): router,
experts, load-balance coefficient, param_init and the sharding_config torchtitan set.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torchtitan.config.override import derive, override
from torchtitan.models.common.moe import MoE as TitanMoE

from spmd_moe.errors import ConfigError
from spmd_moe.integrations.torchtitan import SpmdMoE

__all__ = ["spmd_moe", "TARGET"]

# What to list in --override.imports.
TARGET = f"{__name__}.spmd_moe"


@override(target=TitanMoE.Config, description="spmd_moe MoE layers (spmd_moe.integrations.torchtitan.SpmdMoE)")  # type: ignore[untyped-decorator]
def spmd_moe(cfg: Any, **options: Any) -> Any:
    """torchtitan MoE.Config -> SpmdMoE.Config with the same fields plus ``options``
    (expert_dtype, layout, sequence_parallel, dispatcher, padding)."""
    known = {f.name for f in dataclasses.fields(SpmdMoE.Config) if f.init}
    ours = known - {f.name for f in dataclasses.fields(TitanMoE.Config) if f.init}
    bad = sorted(set(options) - ours)
    if bad:
        raise ConfigError(
            f"--override.imports {TARGET}: unknown options {bad}: expected some of {sorted(ours)}. "
            f"Fix: e.g. '{TARGET}={{\"expert_dtype\": null}}'."
        )
    if isinstance(cfg, SpmdMoE.Config):  # already swapped (e.g. by a config module)
        return dataclasses.replace(cfg, **options)
    return derive(cfg, SpmdMoE.Config, **options)
