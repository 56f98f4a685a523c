"""The diffusion process: noise schedules, training objectives, samplers, guidance and generation."""
