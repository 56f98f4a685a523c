"""The performance benchmark: engine and bare training steps, sampling, FLOPs, utilisation, memory, data loading."""

from diffusion.bench.app import bench, main

__all__ = ["bench", "main"]
