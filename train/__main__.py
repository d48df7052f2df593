"""`accelerate launch -m train --flags` runs one fine-tune (same flags as `chexmem train`)."""

import sys

from train.cli import main

sys.exit(main())
