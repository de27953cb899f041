"""A deterministic, resumable random order over the training samples.

Example::

    sampler = ResumableRandomSampler(len(dataset), seed=0)
    indices = sampler.take(8)  # the next global batch, across epochs
    state = sampler.state_dict()  # saved with every checkpoint
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping

import torch

__all__ = ["ResumableRandomSampler"]

# -- sampling ------------------------------------------------------------------------------------


def _epoch_seed(seed: int, epoch: int) -> int:
    # Hash (seed, epoch) together so that e.g. (0, 1) and (1, 0) give unrelated orders.
    digest = hashlib.sha256(f"{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class ResumableRandomSampler(torch.utils.data.Sampler[int]):
    """Shuffled indices, epoch after epoch, that resume exactly where they stopped.

    Epoch ``e`` is ``torch.randperm(length)`` under a generator seeded by ``(seed, e)``; the state
    is ``(epoch, position)`` within it. ``start_index`` counts samples already drawn over all
    epochs (``epoch, position = divmod(start_index, length)``). ``state_dict`` /
    ``load_state_dict`` make it checkpointable (``accelerator.register_for_checkpointing``).

    It yields indices of the *global* batch order: with several processes, every rank builds it
    with the same seed and takes its part of each global batch, e.g.
    ``sampler.take(batch_size * world_size)[rank::world_size]``, or lets accelerate shard a
    DataLoader built on it (each rank then keeps whole batches in turn). Iterating it (``iter``)
    yields the rest of the current epoch; ``take(n)`` crosses epochs. A DataLoader with workers
    (and accelerate's, which looks one batch ahead) draws indices before they are trained on, so
    its ``state_dict`` is then ahead of training: checkpoint with ``take`` or rebuild with
    ``start_index=samples trained on``. There is deliberately no ``set_epoch``: accelerate calls
    it with its own pass counter, which would reset a resumed epoch.
    """

    def __init__(self, length: int, seed: int, start_index: int = 0):
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        if start_index < 0:
            raise ValueError(f"start_index must be >= 0, got {start_index}")
        self.length = int(length)
        self.seed = int(seed)
        self.epoch, self.position = divmod(int(start_index), self.length)
        self._order: list[int] = []
        self._order_epoch: int | None = None

    @property
    def samples_seen(self) -> int:
        """Indices drawn so far over all epochs (a valid ``start_index``)."""
        return self.epoch * self.length + self.position

    def _current_order(self) -> list[int]:
        if self.position >= self.length:
            self.epoch, self.position = self.epoch + 1, 0
        if self._order_epoch != self.epoch:
            generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
            self._order = torch.randperm(self.length, generator=generator).tolist()
            self._order_epoch = self.epoch
        return self._order

    def take(self, n: int) -> list[int]:
        """The next ``n`` indices, continuing into the next epochs as needed."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        out: list[int] = []
        while len(out) < n:
            order = self._current_order()
            stop = min(self.length, self.position + n - len(out))
            out.extend(order[self.position : stop])
            self.position = stop
        return out

    def __iter__(self) -> Iterator[int]:
        order = self._current_order()
        while self.position < self.length:
            index = order[self.position]
            self.position += 1
            yield index

    def __len__(self) -> int:
        """Indices left in the current epoch (a whole epoch once it is finished)."""
        return self.length - self.position if self.position < self.length else self.length

    def state_dict(self) -> dict[str, int]:
        return {
            "seed": self.seed,
            "length": self.length,
            "epoch": self.epoch,
            "position": self.position,
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        for key in ("seed", "length"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]}, this sampler {getattr(self, key)}: "
                    "the same order cannot be resumed (different seed or dataset size)"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.length:
            raise ValueError(f"invalid sampler state epoch={epoch}, position={position}")
        self.epoch, self.position = epoch, position
