r"""Runs ``clipmoe upcycle`` or ``clipmoe train-llava`` inside ``accelerate launch`` with FSDP or DeepSpeed on the CPU.

Usage (what `tests/test_scaleout.py` launches)::

    accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 2 \
        tests/scaleout_worker.py upcycle ARGS
    accelerate launch --multi_gpu --num_processes 2 tests/scaleout_worker.py llava ARGS \
        --deepspeed configs/deepspeed/zero3.json

Why a worker and not the scripts themselves: accelerate 1.16 enables FSDP and DeepSpeed only on an accelerator
device. On a machine without one, ``Accelerator(cpu=True)`` becomes gloo DDP (``MULTI_CPU``) and drops the FSDP or
DeepSpeed plugin it was given, and ``Accelerator(cpu=False)`` becomes a single process per rank. `cpu_engines`
puts the dropped plugin back into the shared ``AcceleratorState`` right after it is made, so accelerate's own
FSDP2 / DeepSpeed preparation runs over the gloo process group, as it runs over NCCL on GPUs. Nothing else
changes: the run is the library's and the recipes' own code. On GPUs the scripts need no worker.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cpu_engines() -> None:
    """Makes every ``AcceleratorState`` created from now on in this process keep its FSDP / DeepSpeed plugin on
    the CPU (see the module docstring)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_clipmoe_cpu_engines", False):
        return

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        fsdp, deepspeed = kwargs.get("fsdp_plugin"), kwargs.get("deepspeed_plugin")
        for plugin in (deepspeed.values() if isinstance(deepspeed, dict) else [deepspeed] if deepspeed else []):
            if plugin.zero_stage == 3:
                # every parameter of the tiny test models is below DeepSpeed's persistence threshold (kept whole on
                # every rank): 0 partitions them all, as a real model's are
                plugin.deepspeed_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        if self.distributed_type != DistributedType.MULTI_CPU:
            return
        if fsdp is not None:
            self.fsdp_plugin = fsdp
            self.distributed_type = DistributedType.FSDP
        elif deepspeed is not None:
            plugins = deepspeed if isinstance(deepspeed, dict) else {"default": deepspeed}
            for plugin in plugins.values():
                plugin.set_mixed_precision(self._mixed_precision)
            next(iter(plugins.values())).select(_from_accelerator_state=True)
            self.deepspeed_plugins = deepspeed
            self._mixed_precision = "no"  # DeepSpeed handles precision itself (as accelerate does on GPUs)
            self.distributed_type = DistributedType.DEEPSPEED
        else:
            return
        PartialState._shared_state["distributed_type"] = self.distributed_type

    init._clipmoe_cpu_engines = True
    AcceleratorState.__init__ = init


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("upcycle", "llava"):
        raise SystemExit("usage: scaleout_worker.py upcycle|llava ARGS...")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # the Trainer's TrainingArguments make a CPU (gloo) state only when asked; the upcycling CLI does so itself
    os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    cpu_engines()
    if argv[0] == "upcycle":
        from upcycle.cli import main as upcycle_main

        upcycle_main(argv[1:])
    else:
        if "--deepspeed" in argv:
            # On GPUs accelerate starts DeepSpeed's communication layer with the process group; its CPU path starts
            # torch.distributed only. ZeRO-3 needs DeepSpeed's when it partitions the weights as they load, before
            # the Trainer exists (otherwise DeepSpeed counts one process).
            import deepspeed

            deepspeed.comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        from clipmoe_vlm.llava.train import main as llava_main

        llava_main(argv[1:])
    from clipmoe_cli.main import end_process_group

    end_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
