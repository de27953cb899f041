"""Discriminator heads for the DMD2 GAN branch.

A discriminator takes the list of captured teacher features (one spatial map per captured
block) and returns logits ``[B, num_heads]``, one column per block. Each head is
conv k4 s2 -> GroupNorm -> LeakyReLU(0.2) -> conv 1x1 -> global average pool.

Example::

    disc = ImageDiTDiscriminator(feature_channels=1536, num_features=3)
    logits = disc([f15, f22, f29])  # each [B, 1536, H', W'] -> [B, 3]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ImageDiTDiscriminator", "VideoDiTDiscriminator", "group_norm_groups"]


def group_norm_groups(channels: int, preferred: int = 32) -> int:
    """Largest group count <= ``preferred`` that divides ``channels``."""
    for groups in range(min(preferred, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def _channels_list(feature_channels: int | Sequence[int], num_features: int | None) -> list[int]:
    if isinstance(feature_channels, int):
        if num_features is None or num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        return [feature_channels] * num_features
    channels = [int(c) for c in feature_channels]
    if not channels or (num_features is not None and num_features != len(channels)):
        raise ValueError(f"feature_channels={channels} does not match num_features={num_features}")
    return channels


class _DiTDiscriminator(nn.Module):
    _conv: type[nn.Module]
    _spatial_ndim: int

    def __init__(
        self,
        feature_channels: int | Sequence[int],
        num_features: int | None = None,
        *,
        hidden_channels: int | None = None,
    ) -> None:
        super().__init__()
        channels = _channels_list(feature_channels, num_features)
        self.feature_channels = channels
        self.heads = nn.ModuleList(
            self._head(c, hidden_channels or max(c // 2, 1)) for c in channels
        )

    @property
    def num_features(self) -> int:
        return len(self.heads)

    def _head(self, channels: int, hidden: int) -> nn.Module:
        raise NotImplementedError

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) != len(self.heads):
            raise ValueError(
                f"{type(self).__name__} expects {len(self.heads)} feature maps, got {len(features)}"
            )
        logits = []
        for index, (head, feat, channels) in enumerate(
            zip(self.heads, features, self.feature_channels)
        ):
            expected_ndim = 2 + self._spatial_ndim
            if feat.ndim != expected_ndim or feat.shape[1] != channels:
                raise ValueError(
                    f"feature {index} must be [B, {channels}, "
                    + ", ".join(["..."] * self._spatial_ndim)
                    + f"], got shape {tuple(feat.shape)}"
                )
            weight_dtype = next(head.parameters()).dtype
            # Computed in the heads' own dtype (fp32 in training): autocast would run the
            # convolutions in bf16 whatever the weights are.
            with torch.autocast(feat.device.type, enabled=False):
                out = head(feat.to(weight_dtype))
            logits.append(out.flatten(1).mean(dim=1, keepdim=True))
        return torch.cat(logits, dim=1)


class ImageDiTDiscriminator(_DiTDiscriminator):
    """One conv head per captured image feature map ``[B, C, H, W]``; logits ``[B, heads]``.

    Args:
        feature_channels: channels of every captured map (an int for all, or one per map).
        num_features: number of captured maps (needed when ``feature_channels`` is an int).
        hidden_channels: width of each head (default ``C // 2``).
    """

    _spatial_ndim = 2

    def _head(self, channels: int, hidden: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=4, stride=2, padding=1),
            nn.GroupNorm(group_norm_groups(hidden), hidden),
            nn.LeakyReLU(0.2),
            nn.Conv2d(hidden, 1, kernel_size=1),
        )


class VideoDiTDiscriminator(_DiTDiscriminator):
    """One conv head per captured video feature map ``[B, C, F, H, W]``; logits ``[B, heads]``.

    The first conv is 3x4x4 with stride (1, 2, 2): it mixes neighbouring latent frames but keeps
    their count, so a single-frame map (an image through a video model) works too.
    """

    _spatial_ndim = 3

    def _head(self, channels: int, hidden: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv3d(channels, hidden, kernel_size=(3, 4, 4), stride=(1, 2, 2), padding=1),
            nn.GroupNorm(group_norm_groups(hidden), hidden),
            nn.LeakyReLU(0.2),
            nn.Conv3d(hidden, 1, kernel_size=1),
        )
