"""Stop a training run cleanly on SIGTERM (what SLURM and Kubernetes send) or SIGINT (Ctrl-C).

The first signal only sets a flag; at the next iteration boundary the ranks agree on it (one
all-reduce), save a complete checkpoint and end. The handler then gives the signal back to its
default action, so a second signal ends the process at once.

Example::

    with StopRequest() as stop:
        for step in range(start, steps):
            train_step(...)
            if stop.agreed(accelerator):
                save_checkpoint(...)
                break
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import torch

__all__ = ["STOP_SIGNALS", "StopRequest"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """A flag set by SIGTERM / SIGINT while the context is entered (main thread only; elsewhere
    the handlers are left as they are)."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        for sig in STOP_SIGNALS:  # a second signal takes the default action: exit now
            signal.signal(sig, signal.SIG_DFL)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def agreed(self, accelerator: Any) -> bool:
        """Whether any rank was asked to stop (collective: every rank calls it at the same
        iteration, so all stop together)."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)
