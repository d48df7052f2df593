"""Fine-tuning Stable Diffusion on chest X-rays with accelerate; model loading; Hub."""

from hf_datasets.quiet import quiet_third_party

quiet_third_party()
