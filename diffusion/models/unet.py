"""The UNet denoiser (Ho et al. 2020; Dhariwal & Nichol 2021), configurable in width, depth and attention."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.errors import ConfigError
from diffusion.models.layers import (
    AttentionBlock,
    Downsample,
    ResBlock,
    Upsample,
    group_norm,
    sinusoidal_embedding,
    zero_init,
)


class UNet(nn.Module):
    """A UNet over ``image_size`` x ``image_size`` images, conditioned on the timestep and optionally a class.

    Args:
        image_size: side of the square images it is built for; every level must divide it.
        in_channels: channels of the noisy image.
        out_channels: channels of the prediction (defaults to ``in_channels``).
        base_channels: channels of the first level.
        channel_mult: one multiplier of ``base_channels`` per level; each level after the first halves
            the resolution.
        num_res_blocks: residual blocks per level.
        attention_resolutions: feature-map sides (in pixels) at which self-attention is applied.
        num_heads: attention heads.
        dropout: dropout inside the residual blocks.
        num_classes: number of classes for a class embedding, or ``None`` for an unconditional model.
            Index ``num_classes`` is reserved as the "no class" label used for classifier-free guidance.
        time_embed_dropout: dropout on the sinusoidal time embedding (the seed's network used 0.1).
        norm_groups: GroupNorm groups (reduced to a divisor of the channel count where needed).
        cond_channels: extra input channels concatenated to the noisy image (e.g. a low-resolution
            image for super-resolution).
        channels_last: keep weights and activations in the channels-last memory layout, which the CPU's
            and recent GPUs' convolution kernels run fastest (the values are the same).
        patch_size: side of the pixel patches the network works on: each p x p patch of the image becomes p^2
            channels of one feature-map position (pixel unshuffle) and the output is shuffled back, so every level
            runs at 1/p of the image's side and costs about 1/p^2 as much (the patching of Peebles & Xie 2023, DiT;
            the downsampling before the first level of Hoogeboom et al. 2023, simple diffusion). 1: no patches.
        augment_dim: length of the ``augment_labels`` of non-leaky augmentation (``task.augment``), mapped by a
            bias-free linear layer into the conditioning embedding (EDM's ``map_augment``, Karras et al. 2022,
            Appendix C.4); 0: none, and the network has exactly the parameters it had before this option.
    """

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 3,
        out_channels: int | None = None,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        num_heads: int = 4,
        dropout: float = 0.0,
        num_classes: int | None = None,
        time_embed_dropout: float = 0.0,
        norm_groups: int = 32,
        cond_channels: int = 0,
        channels_last: bool = True,
        patch_size: int = 1,
        augment_dim: int = 0,
    ) -> None:
        super().__init__()
        channel_mult = tuple(channel_mult)
        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.cond_channels = cond_channels
        self.num_classes = num_classes
        if not isinstance(patch_size, int) or patch_size < 1:
            raise ConfigError(f"model.patch_size must be a whole number of pixels, at least 1, got {patch_size!r}")
        self.patch_size = patch_size
        if not isinstance(augment_dim, int) or augment_dim < 0:
            raise ConfigError(f"model.augment_dim must be a whole number, at least 0, got {augment_dim!r}")
        self.augment_dim = augment_dim
        self.downsampling_factor = patch_size * 2 ** (len(channel_mult) - 1)
        self.check_image_size(image_size, image_size)
        sides = [image_size // patch_size // 2**i for i in range(len(channel_mult))]
        unknown = sorted(set(attention_resolutions) - set(sides))
        if unknown:
            raise ConfigError(
                f"model.attention_resolutions {unknown} match no level of a {image_size}x{image_size} UNet "
                f"with {len(channel_mult)} levels and patch size {patch_size}; choose from {sides} "
                f"(model.attention_resolutions=[...]) or a model made for this size"
            )

        emb_dim = 4 * base_channels
        self.time_dim = base_channels
        self.time_embed_dropout = nn.Dropout(time_embed_dropout)
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None

        self.input_conv = nn.Conv2d((in_channels + cond_channels) * patch_size**2, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        channels, resolution = base_channels, image_size // patch_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                block = nn.ModuleList([ResBlock(channels, base_channels * mult, emb_dim, dropout, norm_groups)])
                channels = base_channels * mult
                if resolution in attention_resolutions:
                    block.append(AttentionBlock(channels, num_heads, norm_groups))
                self.down.append(block)
                skip_channels.append(channels)
            if level != len(channel_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(channels)]))
                skip_channels.append(channels)
                resolution //= 2

        self.mid = nn.ModuleList(
            [
                ResBlock(channels, channels, emb_dim, dropout, norm_groups),
                AttentionBlock(channels, num_heads, norm_groups),
                ResBlock(channels, channels, emb_dim, dropout, norm_groups),
            ]
        )

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                block = nn.ModuleList(
                    [ResBlock(channels + skip_channels.pop(), base_channels * mult, emb_dim, dropout, norm_groups)]
                )
                channels = base_channels * mult
                if resolution in attention_resolutions:
                    block.append(AttentionBlock(channels, num_heads, norm_groups))
                if level and i == num_res_blocks:
                    block.append(Upsample(channels))
                    resolution *= 2
                self.up.append(block)

        self.out = nn.Sequential(
            group_norm(channels, norm_groups), nn.SiLU(),
            zero_init(nn.Conv2d(channels, self.out_channels * patch_size**2, 3, padding=1)),
        )
        # made last, so the other layers start from the same random weights with or without it
        self.augment_embed = nn.Linear(augment_dim, emb_dim, bias=False) if augment_dim else None
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)

    def check_image_size(self, height: int, width: int) -> None:
        """Raise a ValueError naming the fix when the levels cannot divide the image."""
        if height % self.downsampling_factor or width % self.downsampling_factor:
            halvings = (self.downsampling_factor // self.patch_size).bit_length() - 1
            patches = f"cut into {self.patch_size}x{self.patch_size} patches and " if self.patch_size > 1 else ""
            raise ConfigError(
                f"image size {height}x{width} cannot be {patches}halved {halvings} times by this UNet: use an image "
                f"size divisible by {self.downsampling_factor} (dataset.image_size)"
                + (", fewer levels (model.channel_mult) or smaller patches (model.patch_size)" if self.patch_size > 1
                   else " or fewer levels (model.channel_mult)")
            )

    @property
    def null_label(self) -> int | None:
        """The "no class" label of a class-conditional model (the embedding's last row), else ``None``."""
        return self.num_classes

    def embed(self, t: torch.Tensor, class_labels: torch.Tensor | None,
              augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The conditioning vector: time embedding, plus the class embedding for conditional models (``class_labels``
        indices, or rows of weights over the labels and the "no class" one, mixing their embeddings), plus the
        augmentation labels' embedding for a model with ``augment_dim`` (no labels: zeros, no augmentation)."""
        emb = self.time_mlp(self.time_embed_dropout(sinusoidal_embedding(t, self.time_dim)))
        if self.class_embed is not None:
            if class_labels is None:
                class_labels = torch.full_like(t, self.null_label, dtype=torch.long)
            if class_labels.is_floating_point():  # weights over the labels: a mix of their embeddings
                emb = emb + class_labels.to(emb.dtype) @ self.class_embed.weight.to(emb.dtype)
            else:
                emb = emb + self.class_embed(class_labels)
        if self.augment_embed is not None:  # zeros still pass through the layer, so DDP sees it used
            if augment_labels is None:
                augment_labels = emb.new_zeros(emb.shape[0], self.augment_dim)
            emb = emb + self.augment_embed(augment_labels.to(emb.dtype))
        elif augment_labels is not None:
            raise ConfigError(f"this {type(self).__name__} takes no augmentation labels (model.augment_dim=0): set "
                              f"model.augment_dim={augment_labels.shape[-1]} or task.augment.probability=0")
        return emb

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        x_cond: torch.Tensor | None = None,
        extra_embedding: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict from the noisy image ``x`` at timesteps ``t`` (one per image); ``x_cond`` (``cond_channels``)
        is concatenated to it, ``extra_embedding`` added to the time embedding; ``augment_labels`` (N,
        ``augment_dim``) say how each image was augmented (None: not at all, as at sampling)."""
        self.check_image_size(x.shape[-2], x.shape[-1])
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.embed(t, class_labels, augment_labels)
        if extra_embedding is not None:
            emb = emb + extra_embedding
        if self.cond_channels:
            x = torch.cat([x, x_cond], dim=1)
        if self.patch_size > 1:
            x = F.pixel_unshuffle(x, self.patch_size)
        h = self.input_conv(x.contiguous(memory_format=self.memory_format))
        skips = [h]
        for block in self.down:
            for layer in block:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        for block in self.up:
            h = torch.cat([h, skips.pop()], dim=1)
            for layer in block:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        out = self.out(h)
        if self.patch_size > 1:
            out = F.pixel_shuffle(out, self.patch_size)
        return out.contiguous()
