"""Animated GIFs of the denoising process: the current image beside the predicted clean image."""

from __future__ import annotations

from pathlib import Path

import torch

from diffusion.reports.images import tile, to_pil, upscale_nearest


class TrajectoryRecorder:
    """A sampler callback keeping every ``every``-th step (and the last) of each batch."""

    def __init__(self, every: int = 0, max_frames: int = 60) -> None:
        self.every = every
        self.max_frames = max_frames
        self.batches: list[list[tuple[torch.Tensor, torch.Tensor]]] = []

    def __call__(self, info: dict) -> None:
        if info["i"] == 0:
            self.batches.append([])
        num_steps = info.get("num_steps")  # optional in the sampler contract: without it, every step is kept
        every = self.every or (max(1, -(-num_steps // self.max_frames)) if num_steps else 1)
        if info["i"] % every == 0 or info["i"] == (num_steps or 0) - 1:
            self.batches[-1].append((info["x"].float().cpu(), info["x0"].float().cpu()))

    def save_gif(self, path: str | Path, nrow: int, upscale: int = 2, frame_ms: int = 80) -> Path:
        """Write the frames as a looping GIF; each frame shows the noisy images (left) and their x_0 estimates (right)."""
        frames = []
        for step in range(min(len(batch) for batch in self.batches)):
            x = torch.cat([batch[step][0] for batch in self.batches]).clamp(-1, 1)
            x0 = torch.cat([batch[step][1] for batch in self.batches]).clamp(-1, 1)
            grids = [tile(upscale_nearest(images, upscale), nrow) for images in (x, x0)]
            frames.append(to_pil(tile(torch.stack(grids), nrow=2, padding=4, pad_value=1.0)))
        path = Path(path)
        durations = [frame_ms] * (len(frames) - 1) + [2000]  # hold the final images
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)
        return path
