"""The performance benchmark (``diffusion-bench``): engine and bare training steps, sampling, FLOPs, utilisation,
memory, data loading."""
