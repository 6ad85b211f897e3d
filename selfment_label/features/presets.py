"""Named backbone presets, in the spirit of timm's registry: a name -> timm id and patch size.

Importing this module is cheap (no torch), so the CLI can list the presets in its help.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SelfmentError

WEIGHTS_ENV = "SELFMENT_WEIGHTS"


@dataclass(frozen=True)
class BackbonePreset:
    """A named backbone.

    Arguments:
      name: the preset name users type (``dinov2-vits14``).
      timm_id: the timm model id with its pretrained tag (``vit_small_patch14_dinov2.lvd142m``).
      patch_size: side of a patch in pixels.
      embed_dim: dimension of its tokens.
      depth: number of transformer blocks.
    """

    name: str
    timm_id: str
    patch_size: int
    embed_dim: int
    depth: int

    @property
    def architecture(self) -> str:
        """The timm architecture name, without the pretrained tag."""
        return self.timm_id.split(".")[0]


def _presets() -> dict[str, BackbonePreset]:
    table = [
        ("dino-vits16", "vit_small_patch16_224.dino", 16, 384, 12),
        ("dino-vits8", "vit_small_patch8_224.dino", 8, 384, 12),
        ("dino-vitb16", "vit_base_patch16_224.dino", 16, 768, 12),
        ("dino-vitb8", "vit_base_patch8_224.dino", 8, 768, 12),
        ("dinov2-vits14", "vit_small_patch14_dinov2.lvd142m", 14, 384, 12),
        ("dinov2-vitb14", "vit_base_patch14_dinov2.lvd142m", 14, 768, 12),
        ("dinov2-vitl14", "vit_large_patch14_dinov2.lvd142m", 14, 1024, 24),
        ("dinov2-vitg14", "vit_giant_patch14_dinov2.lvd142m", 14, 1536, 40),
        ("dinov2-vits14-reg", "vit_small_patch14_reg4_dinov2.lvd142m", 14, 384, 12),
        ("dinov2-vitb14-reg", "vit_base_patch14_reg4_dinov2.lvd142m", 14, 768, 12),
        ("dinov2-vitl14-reg", "vit_large_patch14_reg4_dinov2.lvd142m", 14, 1024, 24),
        ("dinov2-vitg14-reg", "vit_giant_patch14_reg4_dinov2.lvd142m", 14, 1536, 40),
        ("dinov3-vits16", "vit_small_patch16_dinov3.lvd1689m", 16, 384, 12),
        ("dinov3-vits16plus", "vit_small_plus_patch16_dinov3.lvd1689m", 16, 384, 12),
        ("dinov3-vitb16", "vit_base_patch16_dinov3.lvd1689m", 16, 768, 12),
        ("dinov3-vitl16", "vit_large_patch16_dinov3.lvd1689m", 16, 1024, 24),
        ("dinov3-vith16plus", "vit_huge_plus_patch16_dinov3.lvd1689m", 16, 1280, 32),
        ("dinov3-vit7b16", "vit_7b_patch16_dinov3.lvd1689m", 16, 4096, 40),
    ]
    return {row[0]: BackbonePreset(*row) for row in table}


PRESETS: dict[str, BackbonePreset] = _presets()


class BackboneError(SelfmentError, RuntimeError):
    """Raised when a backbone cannot be built or its weights cannot be found or loaded."""


def get_preset(name: str) -> BackbonePreset:
    """Return the preset called ``name``; raise ``BackboneError`` listing the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise BackboneError(
            f"unknown backbone {name!r}; choose one of: {', '.join(PRESETS)}"
        ) from None


def presets_like(patch_size: int, embed_dim: int, depth: int) -> list[str]:
    """Names of the presets with this patch size, token dimension and number of blocks."""
    return [
        p.name
        for p in PRESETS.values()
        if (p.patch_size, p.embed_dim, p.depth) == (patch_size, embed_dim, depth)
    ]
