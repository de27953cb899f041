"""DMD2 step distillation of a diffusers teacher into a 1-4 step student.

    accelerate launch train_dmd2.py \\
      --pretrained_model_name_or_path stabilityai/stable-diffusion-3.5-medium \\
      --recipe general/distillation/dmd2_sd35_medium \\
      --dataset_name prompts.jsonl --output_dir sd35-dmd2 --use_lora --max_train_steps 2000

Run with --help for every flag (--list_recipes for the built-in recipes). A mistake in the
flags, recipe or data exits with status 2 and one "error:" line. The machinery lives in
fastgen_diffusers.training.
"""

import sys

from fastgen_diffusers.training import main

if __name__ == "__main__":
    sys.exit(main())
