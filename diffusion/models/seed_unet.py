"""The seed repository's UNet (quickgrid/pytorch-diffusion, ``ddpm.py``), layer for layer, so its checkpoints load.

Module names, shapes and arithmetic follow the seed exactly, quirks included (GroupNorm with one group, no
activation inside the attention block's feed-forward, bilinear upsampling with ``align_corners=True``), since
its published weights depend on them. ``base_channels=64`` and ``time_dim=256`` are the seed's network
(23,334,531 parameters); smaller values give the same architecture at a size for tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.errors import ConfigError


def interleaved_sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[sin(t w_0), cos(t w_0), sin(t w_1), ...] with w_i = max_period^(-2i/dim): the seed's position table row t,
    computed for any (also fractional) t (Vaswani et al. 2017, Sec. 3.5)."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, dim, 2, device=t.device, dtype=torch.float32) / dim)
    args = t.float()[:, None] * freqs[None]
    return torch.stack([torch.sin(args), torch.cos(args)], dim=-1).flatten(1)


class DoubleConv(nn.Module):
    """Conv3x3 - GroupNorm(1) - GELU - Conv3x3 - GroupNorm(1), without biases; ``residual``: gelu(x + f(x))."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None,
                 residual: bool = False) -> None:
        super().__init__()
        mid_channels = mid_channels or out_channels
        self.residual = residual
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(1, mid_channels),
            nn.GELU(),
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(1, out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x + self.double_conv(x)) if self.residual else self.double_conv(x)


class Down(nn.Module):
    """Max-pool by 2, a residual and a plain DoubleConv, then the time embedding added per channel."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int) -> None:
        super().__init__()
        self.maxpool_conv = nn.Sequential(
            nn.MaxPool2d(2), DoubleConv(in_channels, in_channels, residual=True), DoubleConv(in_channels, out_channels)
        )
        self.emb_layer = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, out_channels))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x) + self.emb_layer(emb)[:, :, None, None]


class Up(nn.Module):
    """Bilinear upsampling by 2 (``align_corners=True``), [skip, x] on channels, two DoubleConvs, plus the embedding."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv = nn.Sequential(
            DoubleConv(in_channels, in_channels, residual=True), DoubleConv(in_channels, out_channels, in_channels // 2)
        )
        self.emb_layer = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, out_channels))

    def forward(self, x: torch.Tensor, skip: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = torch.cat([skip, self.up(x)], dim=1)
        return self.conv(x) + self.emb_layer(emb)[:, :, None, None]


ATTENTION = ("sdpa", "seed")


class SelfAttention(nn.Module):
    """a = MHA(LN(x)) + x; out = FF(a) + a with FF = LayerNorm, Linear, LayerNorm, Linear (no activation).

    ``attention="sdpa"`` runs ``mha``'s weights through scaled_dot_product_attention; ``"seed"`` calls ``mha`` as
    the seed does (which also averages the attention weights it discards): the same values, at the seed's speed.
    """

    def __init__(self, channels: int, num_heads: int = 4, attention: str = "sdpa") -> None:
        super().__init__()
        self.attention = attention
        self.mha = nn.MultiheadAttention(channels, num_heads, batch_first=True)
        self.ln = nn.LayerNorm(channels)
        self.ff_self = nn.Sequential(
            nn.LayerNorm(channels), nn.Linear(channels, channels), nn.LayerNorm(channels), nn.Linear(channels, channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.reshape(b, c, h * w).transpose(1, 2)
        normed = self.ln(tokens)
        if self.attention == "seed":
            attended = self.mha(normed, normed, normed)[0] + tokens
        else:  # without the (h w) x (h w) weight matrix that nn.MultiheadAttention's inference path builds
            heads = self.mha.num_heads
            q, k, v = F.linear(normed, self.mha.in_proj_weight, self.mha.in_proj_bias).chunk(3, dim=-1)
            q, k, v = (z.unflatten(-1, (heads, c // heads)).transpose(1, 2) for z in (q, k, v))
            attended = self.mha.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)) + tokens
        out = self.ff_self(attended) + attended
        return out.transpose(1, 2).reshape(b, c, h, w)


class SeedUNet(nn.Module):
    """The seed's unconditional UNet: three Down levels with attention, a three-conv bottleneck, three Up levels.

    Args:
        image_size: side of the square images (the seed trained at 64); a multiple of 8.
        in_channels: image channels (3 in the seed's checkpoints).
        base_channels: width of the first level (64 in the seed); the others are 2x, 4x and 8x.
        time_dim: width of the sinusoidal time embedding (256 in the seed).
        time_embed_dropout: dropout on the time embedding, active in train mode (0.1 in the seed).
        num_classes: must stay ``None``: the seed's network is unconditional.
        channels_last: keep weights and activations in the channels-last memory layout (the same values; faster
            convolutions, and the attention's tokens need no copy).
        attention: ``sdpa`` (scaled_dot_product_attention on the seed's weights) or ``seed`` (nn.MultiheadAttention
            called as the seed calls it: the seed's speed, for comparisons).
    """

    def __init__(self, image_size: int = 64, in_channels: int = 3, base_channels: int = 64, time_dim: int = 256,
                 time_embed_dropout: float = 0.1, num_classes: int | None = None, channels_last: bool = True,
                 attention: str = "sdpa") -> None:
        super().__init__()
        if attention not in ATTENTION:
            raise ConfigError(f"model.attention={attention!r} is not known; choose one of {list(ATTENTION)}")
        if num_classes is not None:
            raise ConfigError(f"model=seed_unet is the seed's unconditional network; got "
                              f"model.num_classes={num_classes}: drop it, or use model=unet_small for a "
                              "class-conditional model")
        self.image_size, self.in_channels, self.num_classes, self.time_dim = image_size, in_channels, None, time_dim
        self.check_image_size(image_size, image_size)
        c = base_channels
        self.time_embed_dropout = nn.Dropout(time_embed_dropout)
        self.input_conv = DoubleConv(in_channels, c)
        self.down1, self.sa1 = Down(c, 2 * c, time_dim), SelfAttention(2 * c, attention=attention)
        self.down2, self.sa2 = Down(2 * c, 4 * c, time_dim), SelfAttention(4 * c, attention=attention)
        self.down3, self.sa3 = Down(4 * c, 4 * c, time_dim), SelfAttention(4 * c, attention=attention)
        self.bottleneck1 = DoubleConv(4 * c, 8 * c)
        self.bottleneck2 = DoubleConv(8 * c, 8 * c)
        self.bottleneck3 = DoubleConv(8 * c, 4 * c)
        self.up1, self.sa4 = Up(8 * c, 2 * c, time_dim), SelfAttention(2 * c, attention=attention)
        self.up2, self.sa5 = Up(4 * c, c, time_dim), SelfAttention(c, attention=attention)
        self.up3, self.sa6 = Up(2 * c, c, time_dim), SelfAttention(c, attention=attention)
        self.out_conv = nn.Conv2d(c, in_channels, kernel_size=1)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)

    @property
    def null_label(self) -> None:
        """No "no class" label: the network is unconditional."""
        return None

    def check_image_size(self, height: int, width: int) -> None:
        """Raise a ValueError naming the fix when three halvings cannot divide the image."""
        if height % 8 or width % 8:
            raise ConfigError(f"model=seed_unet halves images three times, so {height}x{width} does not fit: use an "
                              "image size divisible by 8 (the seed's checkpoints are 64x64: dataset.image_size=64)")

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the noise in ``x`` at timesteps ``t`` (one per image); ``class_labels`` must be None."""
        if class_labels is not None:
            raise ConfigError("model=seed_unet is unconditional: sample it without class labels (class_label=null)")
        self.check_image_size(x.shape[-2], x.shape[-1])
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed_dropout(interleaved_sinusoidal_embedding(t, self.time_dim))
        x1 = self.input_conv(x.contiguous(memory_format=self.memory_format))
        x2 = self.sa1(self.down1(x1, emb))
        x3 = self.sa2(self.down2(x2, emb))
        x4 = self.sa3(self.down3(x3, emb))
        x4 = self.bottleneck3(self.bottleneck2(self.bottleneck1(x4)))
        x = self.sa4(self.up1(x4, x3, emb))
        x = self.sa5(self.up2(x, x2, emb))
        x = self.sa6(self.up3(x, x1, emb))
        return self.out_conv(x)
