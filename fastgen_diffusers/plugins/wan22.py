"""Wan 2.2 entry point: the Wan plugin (:mod:`fastgen_diffusers.plugins.wan`) under the name the
FastGen API documents.

Wan 2.1 and 2.2 share ``WanTransformer3DModel`` and one plugin; this module re-exports it so the
documented call works on a raw transformer and on :class:`WanWrapper` alike::

    from fastgen_diffusers.plugins import wan22

    teacher = wan22.WanWrapper.from_pretrained(path)  # Wan 2.2 TI2V-5B: 30 layers
    capture = wan22.attach_feature_capture(teacher, feature_indices=[15, 22, 29])
    disc = wan22.build_discriminator(teacher, capture.feature_indices)
"""

from __future__ import annotations

# The Wan plugin's public names, listed once in its __all__.
from .wan import *  # noqa: F403
from .wan import __all__  # noqa: F401
