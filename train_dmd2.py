"""DMD2 step distillation of a diffusers teacher into a 1-4 step student.

    accelerate launch train_dmd2.py \\
      --pretrained_model_name_or_path stabilityai/stable-diffusion-3.5-medium \\
      --recipe general/distillation/dmd2_sd35_medium \\
      --dataset_name prompts.jsonl --output_dir sd35-dmd2 --use_lora --max_train_steps 2000

Run with --help for every flag. The machinery lives in fastgen_diffusers.training.
"""

import sys

from fastgen_diffusers.training import parse_args, train
from fastgen_diffusers.training.errors import UserError
from fastgen_diffusers.training.hub import HubUploadError, IncompleteOutputError

if __name__ == "__main__":
    try:
        train(parse_args())
    except UserError as err:
        # A bad flag, login or tracker set-up, found before any model was loaded.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (HubUploadError, IncompleteOutputError) as err:
        # The local output is complete and intact; only the upload failed.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
