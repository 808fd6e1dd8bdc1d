"""``vit_tiny``: a small pure-PyTorch vision transformer for per-frame video models.

Written the way timm writes its ViTs (``PatchEmbed`` with a strided conv, blocks of
``norm1 -> Attention(qkv, F.scaled_dot_product_attention, proj) -> residual`` and
``norm2 -> Mlp(fc1, GELU, fc2) -> residual``, a final ``LayerNorm``), so that what
:func:`deltasparse.convert` and :class:`deltasparse.DeltaEngine` do with it they do with timm's
models too. The tokens are mean-pooled (no class token) before the classifier: every patch
token is a spatial position of the frame, as a pixel is for a CNN.
"""

from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .registry import register_model

__all__ = ["Attention", "Block", "Mlp", "PatchEmbed", "VisionTransformer",
           "tokens_with_position", "vit_tiny"]  # fmt: skip


def tokens_with_position(feat: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``(N, D, h, w)`` patch features -> ``(N, h*w, D)`` tokens plus the position embedding
    ``pos`` ``(1, L, D)`` of a square grid, resized bicubically when the grid is not that one
    (frames at another resolution than the model was built for). An fx leaf function."""
    n, d, h, w = feat.shape
    tokens = feat.flatten(2).transpose(1, 2)
    if h * w != pos.shape[1]:
        side = math.isqrt(pos.shape[1])
        grid = pos.reshape(1, side, side, d).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        pos = grid.flatten(2).transpose(1, 2)
    return tokens + pos


torch.fx.wrap("tokens_with_position")


class PatchEmbed(nn.Module):
    """``(N, C, H, W) -> (N, D, H/p, W/p)``: a conv with kernel = stride = patch size (the
    tokens are its pixels; :func:`tokens_with_position` flattens them)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(
                f"img_size {img_size} is not a multiple of patch_size {patch_size}; pick a "
                "resolution that the patches tile"
            )
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Attention(nn.Module):
    """Multi-head self-attention as timm writes it: one ``qkv`` linear, SDPA, ``proj``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Patch embedding, learned position embeddings, ``depth`` blocks, mean-pooled tokens."""

    def __init__(self, num_classes: int = 10, img_size: int = 64, patch_size: int = 16,
                 in_chans: int = 3, embed_dim: int = 192, depth: int = 12, num_heads: int = 3,
                 mlp_ratio: float = 4.0, drop_rate: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = tokens_with_position(self.patch_embed(x), self.pos_embed)
        x = self.norm(self.blocks(x))
        return self.head(self.head_drop(x.mean(dim=1)))


@register_model("vit_tiny", tokens=True)
def vit_tiny(num_classes: int = 10, img_size: int = 64, **kw) -> VisionTransformer:
    """ViT-Tiny widths (embed 192, 3 heads, MLP 768) with patch 16; ``depth`` 12 by default."""
    kw.setdefault("patch_size", 16)
    kw.setdefault("embed_dim", 192)
    kw.setdefault("num_heads", 3)
    kw.setdefault("depth", 12)
    return VisionTransformer(num_classes=num_classes, img_size=img_size, **kw)
