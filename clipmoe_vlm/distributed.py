"""How this process runs: which engine manages the parameters, across how many processes.

A checkpoint records both (upcycling stages and LLaVA runs alike) and is resumed only as it was launched: a sharded
engine's files cannot be read under another engine or number of processes, and under DDP another number of
processes is another global batch, so the continued run would not be the saved one.
"""

from __future__ import annotations

__all__ = ["describe_launch", "sharded_engine"]


def sharded_engine(accelerator) -> str | None:
    """``"FSDP2"``, ``"FSDP"`` or ``"DeepSpeed ZeRO-N"`` when ``accelerator`` runs one of them (they manage the
    parameters and optimizer state themselves), else None (one process, DDP)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return "FSDP2" if accelerator.is_fsdp2 else "FSDP"
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    return None


def describe_launch(engine: str | None, processes: int) -> str:
    """``"2 processes under FSDP2"``, ``"1 process"``: how a run was launched, in words."""
    return f"{processes} process{'es' if processes > 1 else ''}" + (f" under {engine}" if engine else "")
