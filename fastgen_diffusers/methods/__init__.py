"""Distillation methods."""

from .dmd import DMDPipeline

__all__ = ["DMDPipeline"]
