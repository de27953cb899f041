"""Shared tiny networks and fixtures for the loss-library tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class TinyDiT(nn.Module):
    """A small conv "transformer" in the pipeline convention with a list of blocks.

    ``forward(hidden_states [B,C,H,W], timestep [B], encoder_hidden_states [B,D])`` returns a
    tuple whose first item is the prediction (as diffusers does with ``return_dict=False``).
    """

    def __init__(self, channels: int = 4, width: int = 8, depth: int = 3, cond_dim: int = 8):
        super().__init__()
        self.proj_in = nn.Conv2d(channels, width, 1)
        self.time_embed = nn.Linear(1, width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.blocks = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(depth))
        self.proj_out = nn.Conv2d(width, channels, 1)

    def forward(self, hidden_states, timestep, encoder_hidden_states=None, scale=None):
        h = self.proj_in(hidden_states)
        h = h + self.time_embed(timestep[:, None].to(h.dtype))[:, :, None, None]
        if encoder_hidden_states is not None:
            h = h + self.cond_embed(encoder_hidden_states.to(h.dtype))[:, :, None, None]
        if scale is not None:
            h = h * scale[:, None, None, None]
        for block in self.blocks:
            h = torch.nn.functional.silu(block(h))
        return (self.proj_out(h),)


@pytest.fixture
def tiny_dit():
    def make(seed: int = 0, **kwargs) -> TinyDiT:
        torch.manual_seed(seed)
        return TinyDiT(**kwargs)

    return make


@pytest.fixture(scope="module")
def quiet_diffusers():
    """diffusers' and transformers' logs and progress bars off for the module's tests, restored
    afterwards (tiny pipelines log warnings that say nothing about the code under test). Use with
    ``pytestmark = pytest.mark.usefixtures("quiet_diffusers")``."""
    import logging

    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logger = logging.getLogger("transformers")
    level = transformers_logger.level
    transformers_logger.setLevel(logging.ERROR)
    yield
    transformers_logger.setLevel(level)
    diffusers_logging.set_verbosity(verbosity)
    diffusers_logging.enable_progress_bar()


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for the module's tests, restored afterwards.

    Tiny matmuls gain nothing from threads, and on a shared 2-core machine spinning OpenMP
    threads make each tiny forward orders of magnitude slower (measured 33 ms vs 10 us for a
    tiny linear). Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test starts without accelerate's process-wide state: a training run in an earlier
    test (say in fp32) would otherwise refuse this one's mixed precision."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
