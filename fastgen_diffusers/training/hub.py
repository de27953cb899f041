"""Upload of an exported student folder to the Hugging Face Hub.

:func:`prepare_hub_repo` runs before the teacher loads: it checks the login (``whoami``) and
creates the repo, so a bad token or a refused repo stops the run at once (a
:class:`~fastgen_diffusers.training.errors.UserError`), not after hours of training. The export
is checked before the upload (model card, weights, scheduler config): an incomplete export is
refused before any request. Checkpoints, logs and temporary files stay local. A failed upload
raises :class:`HubUploadError` and never touches the local files; its message holds the command
that retries the upload::

    python -m fastgen_diffusers.training.hub OUTPUT_DIR --hub_model_id ID [--private]

Example::

    from fastgen_diffusers.training.hub import push_to_hub

    url = push_to_hub("out", "me/sd35m-dmd2-4step", private=True)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi
from huggingface_hub.utils import HFValidationError, filter_repo_objects, validate_repo_id

from .errors import UserError

__all__ = [
    "CHECKPOINT_UPLOAD_PATTERNS",
    "DEFAULT_IGNORE_PATTERNS",
    "HubUploadError",
    "IncompleteOutputError",
    "check_output_complete",
    "main",
    "prepare_hub_repo",
    "push_checkpoint",
    "push_to_hub",
    "retry_command",
]

logger = logging.getLogger(__name__)

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


def _transformer_problems(folder: Path, files: set[str], name: str = "transformer") -> list[str]:
    """What ``<name>/`` lacks among ``files`` (paths relative to ``folder``)."""
    problems = [] if f"{name}/config.json" in files else [f"{name}/config.json"]
    index = f"{name}/{_SHARD_INDEX}"
    if index in files:
        # A sharded save: every shard the index names must be there.
        try:
            weight_map = json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError):
            return [*problems, f"a readable weight_map in {index}"]
        shards = sorted({f"{name}/{shard}" for shard in weight_map.values()})
        problems += [shard for shard in shards if shard not in files]
    elif not any(f.startswith(f"{name}/") and f.endswith(".safetensors") for f in files):
        problems.append(f"{name}/*.safetensors")
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
        if any(f.startswith("transformer_2/") for f in files):  # Wan 2.2 A14B's second expert
            missing += _transformer_problems(folder, files, "transformer_2")
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
            f"the local files at {str(folder)!r} are intact. Cause: {type(err).__name__}: {err}\n"
            "Fix the cause, then retry the upload with:\n  "
            + retry_command(folder, target, private=private),
            repo_id=target,
            endpoint=api.endpoint,
            output_dir=folder,
        ) from err
    return str(info.commit_url)


# What a checkpoint uploads with --push_checkpoints_to_hub: the student as the stock pipeline
# loads it (transformer/ or the LoRA file, scheduler/), never the training state (state/,
# trainer_state.json, optimizer or RNG states).
CHECKPOINT_UPLOAD_PATTERNS: tuple[str, ...] = (
    "transformer/*",
    "pytorch_lora_weights.safetensors",
    # Wan 2.2 A14B: the low-noise expert
    "transformer_2/*",
    "pytorch_lora_weights_transformer_2.safetensors",
    "scheduler/*",
)


def retry_command(output_dir: str | os.PathLike, repo_id: str, *, private: bool = False) -> str:
    """The shell command that uploads ``output_dir`` to ``repo_id`` again (this module's
    ``__main__``), with the folder as an absolute path so it runs from any directory."""
    parts = ["python", "-m", "fastgen_diffusers.training.hub", str(Path(output_dir).resolve())]
    parts += ["--hub_model_id", repo_id] + (["--private"] if private else [])
    return shlex.join(parts)


def _cause(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def prepare_hub_repo(args: Any, *, endpoint: str | None = None) -> str:
    """Check the Hub login and create the repo (``exist_ok``) of ``--push_to_hub``, before any
    model is loaded; returns the full repo id (``namespace/name``).

    The repo is ``--hub_model_id`` (a bare name goes to the login's namespace), or, without
    it, the output folder's name under the login's namespace. The token is ``--hub_token``,
    else ``HF_TOKEN`` or the cached login. ``args`` is a
    :class:`~fastgen_diffusers.training.args.TrainingArguments` (``hub_model_id``,
    ``hub_token``, ``hub_private``, ``output_dir``).

    Raises:
        UserError: no valid login, a repo id the Hub cannot take, or a repo that cannot be
            created or written; the message says what to fix. Nothing has been trained yet.
    """
    api = HfApi(endpoint=endpoint, token=args.hub_token)
    where = f"the Hub at {api.endpoint}"
    try:
        user = api.whoami()
    except Exception as err:
        raise UserError(
            f"--push_to_hub: no valid Hugging Face login for {where} ({_cause(err)}). Log in "
            "with `hf auth login` or set HF_TOKEN to a token with write access, then run again"
        ) from err
    name = args.hub_model_id or Path(args.output_dir).resolve().name
    repo_id = name if "/" in name else f"{user['name']}/{name}"
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        flag = "--hub_model_id" if args.hub_model_id else "the --output_dir folder name"
        raise UserError(
            f"--push_to_hub: {flag} gives the repo id {repo_id!r}, which the Hub does not accept "
            f"({err}); pass --hub_model_id namespace/name with letters, digits, '-', '_', '.'"
        ) from err
    try:
        return api.create_repo(repo_id, exist_ok=True, private=args.hub_private).repo_id
    except Exception as err:
        raise UserError(
            f"--push_to_hub: cannot create or write the repo {repo_id!r} on {where} "
            f"({_cause(err)}); check that the token may write to that namespace, or pass another "
            "--hub_model_id"
        ) from err


def push_checkpoint(
    checkpoint_dir: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    endpoint: str | None = None,
) -> str | None:
    """Upload the loadable student of a completed checkpoint to the ``checkpoint-<N>/`` folder
    of ``repo_id`` (files matching :data:`CHECKPOINT_UPLOAD_PATTERNS`; ``pipe.load_lora_weights(
    repo_id, subfolder="checkpoint-N")`` or ``from_pretrained(repo_id,
    subfolder="checkpoint-N/transformer")`` load them); returns the commit URL.

    Training goes on whatever happens here: a failure is logged as a warning and returns
    ``None`` (the checkpoint stays on disk and the final push is unaffected).
    """
    folder = Path(checkpoint_dir)
    try:
        info = HfApi(endpoint=endpoint, token=token).upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            path_in_repo=folder.name,
            allow_patterns=list(CHECKPOINT_UPLOAD_PATTERNS),
            commit_message=f"Upload {folder.name}",
        )
    except Exception as err:
        logger.warning(
            "Uploading %s to %s failed (%s); training goes on and the checkpoint stays local",
            folder,
            repo_id,
            _cause(err),
        )
        return None
    return str(info.commit_url)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fastgen_diffusers.training.hub OUTPUT_DIR --hub_model_id ID [--private]``:
    upload a finished export (the token comes from ``HF_TOKEN`` or the cached login)."""
    parser = argparse.ArgumentParser(
        prog="python -m fastgen_diffusers.training.hub",
        description="Upload an exported DMD2 student (the --output_dir of train_dmd2.py) to the "
        "Hub, without checkpoints, logs or the cache. Token: HF_TOKEN or `hf auth login`.",
    )
    parser.add_argument("output_dir", help="The training run's --output_dir.")
    parser.add_argument("--hub_model_id", required=True, help="Repository id, namespace/name.")
    parser.add_argument("--private", action="store_true", help="Create the repo private.")
    parser.add_argument("--commit_message", default="Upload DMD2 student")
    args = parser.parse_args(argv)
    try:
        url = push_to_hub(
            args.output_dir,
            args.hub_model_id,
            private=args.private,
            commit_message=args.commit_message,
        )
    except IncompleteOutputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except HubUploadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"Uploaded {args.output_dir} to {args.hub_model_id}: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
