"""The command line of ``train_dmd2.py``: :func:`main` parses the flags, runs the training and
turns a user's mistake into one ``error:`` line and exit status 2.

Example::

    import sys
    from fastgen_diffusers.training import main

    sys.exit(main())  # or main(["--pretrained_model_name_or_path", ..., "--recipe", ...])
"""

from __future__ import annotations

import sys

from .errors import UserError, disk_full_path, is_disk_full

__all__ = ["main"]

USER_ERROR_STATUS = 2  # argparse's status for a bad command line
UPLOAD_ERROR_STATUS = 1


def main(argv: list[str] | None = None) -> int:
    """Run ``train_dmd2.py`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    0: done. 2: a mistake in the flags, recipe, data or files (one ``error: ...`` line on
    stderr naming what was wrong and what to do; nothing loaded after the check that caught it)
    or a full disk. 1: the output is complete locally but the Hub upload failed. Anything else
    is a fault of the program and propagates with its traceback.
    """
    from .args import parse_args

    try:
        args = parse_args(argv)
    except SystemExit as exit_:  # argparse printed usage and message (or --help, --list_recipes)
        return exit_.code if isinstance(exit_.code, int) else USER_ERROR_STATUS

    from .hub import HubUploadError, IncompleteOutputError
    from .loop import train

    try:
        train(args)
    except UserError as err:
        _say(str(err))
        return USER_ERROR_STATUS
    except (HubUploadError, IncompleteOutputError) as err:
        # The local output is complete and intact; only the upload failed.
        _say(str(err))
        return UPLOAD_ERROR_STATUS
    except Exception as err:
        if not is_disk_full(err):
            raise
        where = disk_full_path(err) or f"the disk holding --output_dir {args.output_dir!r}"
        _say(
            f"no space left on {where} ({err}); files being written were removed, the last "
            "complete checkpoint is intact: free space (or pass another --output_dir / "
            "--embedding_cache_dir) and resume with --resume_from_checkpoint latest"
        )
        return USER_ERROR_STATUS
    return 0


def _say(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
