"""TEST HARNESS: ``train_dmd2.py``'s training run on accelerate's FSDP2 path, on CPU ranks.

accelerate enables FSDP only on accelerators: on a CPU-only machine it drops the FSDP plugin and
runs plain data parallel. This harness (tests only) builds the FSDP2 plugin from the environment
variables ``accelerate launch`` sets from an FSDP config file (mixed precision included: the
README's config trains in bf16; ``--mixed_precision`` on the command line overrides it), lets the
real ``Accelerator.__init__`` run, and then switches accelerate's shared state to FSDP (both
``PartialState`` and ``AcceleratorState``: a later ``AcceleratorState()`` copies the former back).
Everything after that is the real training code.

    torchrun --nproc_per_node 2 tests/fsdp2_harness.py <train_dmd2.py arguments>
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

import fastgen_diffusers.training.setup as setup
from fastgen_diffusers.training import parse_args, train

ROOT = Path(__file__).resolve().parent.parent
# The README's FSDP2 config: the plugin under test is the one it gives.
CONFIG = ROOT / "examples" / "accelerate" / "fsdp2_8gpu.yaml"


def fsdp_env_from_config(config_file: str | os.PathLike) -> dict[str, str]:
    """What ``accelerate launch --config_file config_file`` sets for the training run: the
    ``FSDP_*`` variables, the mixed precision (``ACCELERATE_MIXED_PRECISION``) and the dynamo
    options (``ACCELERATE_DYNAMO_*``)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "x.py"])
    args, _, _ = _validate_launch_command(args)
    keep = ("FSDP_", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_")
    return {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(keep)}


class CPUFSDP2Accelerator(Accelerator):
    """An ``Accelerator`` whose state is forced onto the FSDP2 path (tests only)."""

    def __init__(self, *args, **kwargs) -> None:
        os.environ.update(fsdp_env_from_config(os.environ.get("FSDP_TEST_CONFIG", CONFIG)))
        if "FSDP_TEST_STATE_DICT_TYPE" in os.environ:
            os.environ["FSDP_STATE_DICT_TYPE"] = os.environ["FSDP_TEST_STATE_DICT_TYPE"]
        plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables, as launch does
        if plugin.fsdp_version != 2:
            raise ValueError(f"{CONFIG} does not select FSDP2 (fsdp_version={plugin.fsdp_version})")
        super().__init__(*args, fsdp_plugin=plugin, **kwargs)
        PartialState().distributed_type = DistributedType.FSDP
        self.state.distributed_type = DistributedType.FSDP
        self.state.fsdp_plugin = plugin
        if self.state.mixed_precision != "no":  # what AcceleratorState does on its FSDP branch
            plugin.set_mixed_precision(self.state.mixed_precision)


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    setup.Accelerator = CPUFSDP2Accelerator  # the one place the run builds its Accelerator
    train(parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
