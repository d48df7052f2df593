"""`accelerate launch -m detect --flags` scores prompts on many processes (= `chexmem detect`)."""

import sys

from detect.cli import main

sys.exit(main())
