"""Fine-tuning Stable Diffusion on chest X-rays with accelerate; model loading; Hub."""
