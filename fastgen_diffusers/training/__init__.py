"""Training machinery behind ``train_dmd2.py``: data and embedding cache, the accelerate loop,
checkpoints and exact resume, validation, export, model card, Hub upload.

Example::

    from fastgen_diffusers.training import main, parse_args, train

    train(parse_args())  # raises on any error
    sys.exit(main())     # the command line: a user's mistake is one line and status 2
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "TrainingArguments",
    "UserError",
    "build_parser",
    "load_recipe",
    "main",
    "parse_args",
    "preflight",
    "train",
]

_LOCATIONS = {
    "TrainingArguments": "args",
    "build_parser": "args",
    "parse_args": "args",
    "load_recipe": "loop",
    "main": "cli",
    "preflight": "preflight",
    "UserError": "errors",
    "train": "loop",
}


def __getattr__(name: str) -> Any:
    # Submodules load on first use, so `training.hub` or `training.data` import on their own.
    if name in _LOCATIONS:
        return getattr(importlib.import_module(f".{_LOCATIONS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
