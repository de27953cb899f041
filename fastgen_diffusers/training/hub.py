"""Upload of an exported student folder to the Hugging Face Hub.

The folder is checked first (model card, weights, scheduler config): an incomplete export is
refused before any request. Checkpoints, logs and temporary files stay local. A failed upload
raises :class:`HubUploadError` and never touches the local files, so the push can be retried.

Example::

    from fastgen_diffusers.training.hub import push_to_hub

    url = push_to_hub("out", "me/sd35m-dmd2-4step", private=True)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.utils import filter_repo_objects

__all__ = [
    "DEFAULT_IGNORE_PATTERNS",
    "HubUploadError",
    "IncompleteOutputError",
    "check_output_complete",
    "push_to_hub",
]

# Training state and scratch files, relative to the output folder (fnmatch: `*` crosses `/`).
DEFAULT_IGNORE_PATTERNS: tuple[str, ...] = (
    "checkpoint-*",
    "checkpoints/*",
    "logs/*",
    "cache/*",  # the embedding / latent cache of training
    "*.tmp*",
    ".tmp*",
)
_LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
_SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
_SHARD_INDEX = "diffusion_pytorch_model.safetensors.index.json"


class IncompleteOutputError(ValueError):
    """The output folder lacks files a published student needs; nothing was uploaded."""


class HubUploadError(RuntimeError):
    """Creating the repo or uploading to it failed; the local folder is unchanged."""

    def __init__(self, message: str, *, repo_id: str, endpoint: str, output_dir: Path) -> None:
        super().__init__(message)
        self.repo_id = repo_id
        self.endpoint = endpoint
        self.output_dir = output_dir


def _transformer_problems(folder: Path, files: set[str]) -> list[str]:
    """What ``transformer/`` lacks among ``files`` (paths relative to ``folder``)."""
    problems = [] if "transformer/config.json" in files else ["transformer/config.json"]
    index = f"transformer/{_SHARD_INDEX}"
    if index in files:
        # A sharded save: every shard the index names must be there.
        try:
            weight_map = json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError):
            return [*problems, f"a readable weight_map in {index}"]
        shards = sorted({f"transformer/{name}" for name in weight_map.values()})
        problems += [shard for shard in shards if shard not in files]
    elif not any(f.startswith("transformer/") and f.endswith(".safetensors") for f in files):
        problems.append("transformer/*.safetensors")
    return problems


def check_output_complete(
    output_dir: str | os.PathLike, ignore_patterns: Sequence[str] = DEFAULT_IGNORE_PATTERNS
) -> Path:
    """Raise :class:`IncompleteOutputError` unless the files of ``output_dir`` that would be
    uploaded (``ignore_patterns`` left out) make a publishable student: ``README.md``,
    ``scheduler/scheduler_config.json`` and the weights, either ``transformer/``
    (``config.json`` plus every ``.safetensors`` shard) or ``pytorch_lora_weights.safetensors``.
    Returns the folder as a ``Path``."""
    folder = Path(output_dir)
    if not folder.is_dir():
        raise IncompleteOutputError(f"output_dir={str(folder)!r} is not a directory")
    # The same selection upload_folder makes, so the check sees exactly what will be published.
    files = set(
        filter_repo_objects(
            (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()),
            ignore_patterns=list(ignore_patterns),
        )
    )
    missing = [name for name in ("README.md", _SCHEDULER_CONFIG) if name not in files]
    if any(f.startswith("transformer/") for f in files):
        missing += _transformer_problems(folder, files)
    elif _LORA_WEIGHTS not in files:
        missing.append(f"transformer/ or {_LORA_WEIGHTS}")
    if missing:
        raise IncompleteOutputError(
            f"output_dir={str(folder)!r} is not a complete student export: missing "
            f"{', '.join(missing)}. Expected README.md (write_model_card), "
            f"{_SCHEDULER_CONFIG} and the weights (transformer/ or {_LORA_WEIGHTS}), as the "
            "export step writes them; nothing was uploaded"
        )
    return folder


def push_to_hub(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload DMD2 student",
    ignore_patterns: Sequence[str] = DEFAULT_IGNORE_PATTERNS,
    endpoint: str | None = None,
) -> str:
    """Create ``repo_id`` (if needed) and upload ``output_dir`` to it; returns the commit URL.

    Args:
        output_dir: a complete export (see :func:`check_output_complete`).
        repo_id: ``"namespace/name"``; a bare name goes to the token owner's namespace.
        token: Hub token; default: the stored login / ``HF_TOKEN``.
        private: create the repo private (an existing repo keeps its visibility).
        commit_message: message of the upload commit.
        ignore_patterns: paths (relative to ``output_dir``) left out of the upload; default:
            checkpoints, logs and temporary files.
        endpoint: Hub URL; default: ``huggingface_hub``'s (``HF_ENDPOINT``).

    Raises:
        IncompleteOutputError: before any request, when the export is incomplete.
        HubUploadError: when the Hub refuses or cannot be reached; the local files are intact.
    """
    folder = check_output_complete(output_dir, ignore_patterns)
    api = HfApi(endpoint=endpoint, token=token)
    target, step = repo_id, "creating the repo"
    try:
        target = api.create_repo(repo_id, exist_ok=True, private=private).repo_id
        step = "uploading the folder"
        info = api.upload_folder(
            repo_id=target,
            folder_path=folder,
            commit_message=commit_message,
            # A fresh list: upload_folder appends its own patterns to the one it is given.
            ignore_patterns=list(ignore_patterns),
        )
    # Any failure (HTTP status, transport, payload validation) is reported the same way: what
    # was attempted, where, and why.
    except Exception as err:
        raise HubUploadError(
            f"Pushing {str(folder)!r} to repo {target!r} at {api.endpoint} failed while {step}; "
            f"the local files at {str(folder)!r} are intact: fix the cause and call push_to_hub "
            f"again. Cause: {type(err).__name__}: {err}",
            repo_id=target,
            endpoint=api.endpoint,
            output_dir=folder,
        ) from err
    return str(info.commit_url)
