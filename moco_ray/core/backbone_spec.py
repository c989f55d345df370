"""How to build a backbone, as one typed value: made from the config once, written to and read from encoder.json.

A ResNet needs its torchvision name and the small-stem switch; a Vision Transformer also needs its image and patch
size and its width / depth / heads (tiny ViTs make CPU tests cheap). Threading one frozen value through the
trainer, the exports, the evaluation and the MLflow artifact keeps those call sites from each growing loose fields.
Plain Python (the config layer reads it; nothing here imports torch).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from moco_ray.core.defaults import FEATURE_DIMS, VIT_ARCHS, feature_dim


@dataclass(frozen=True)
class BackboneSpec:
    """Everything a backbone's module depends on. ViT fields are 0 for a ResNet (and resolved for a ViT).

    ``stop_grad_conv1`` (moco-v3 ``--stop-grad-conv1``: the patch projection is frozen) changes training only, not
    the module's keys, so a plain timm model loads the weights either way.
    """

    arch: str
    small_stem: bool = False
    img_size: int = 0
    patch_size: int = 0
    embed_dim: int = 0
    depth: int = 0
    num_heads: int = 0
    stop_grad_conv1: bool = False

    @classmethod
    def resolve(
        cls,
        arch: str,
        small_stem: bool = False,
        image_size: int = 224,
        patch_size: int = 0,
        width: int = 0,
        depth: int = 0,
        heads: int = 0,
        stop_grad_conv1: bool = False,
    ) -> BackboneSpec:
        """The spec of ``arch`` with every 0 replaced by the arch's own value (ViT); ResNets ignore the ViT fields."""
        feature_dim(arch)  # a clear error for an unknown name
        if arch not in VIT_ARCHS:
            return cls(arch, small_stem)
        vit = VIT_ARCHS[arch]
        return cls(
            arch,
            False,
            img_size=image_size,
            patch_size=patch_size or vit["patch_size"],
            embed_dim=width or vit["embed_dim"],
            depth=depth or vit["depth"],
            num_heads=heads or vit["num_heads"],
            stop_grad_conv1=stop_grad_conv1,
        )

    @property
    def is_vit(self) -> bool:
        return self.arch in VIT_ARCHS

    @property
    def feature_dim(self) -> int:
        """Width of the pooled feature (ResNet: after avg-pool; ViT: the class token after the final norm)."""
        return self.embed_dim if self.is_vit else FEATURE_DIMS[self.arch]

    def timm_kwargs(self) -> dict[str, int]:
        """Keyword arguments of ``timm.models.vision_transformer.VisionTransformer`` that build this backbone as a
        plain timm model (timm's defaults already are moco-v3's: mlp_ratio 4, qkv_bias, LayerNorm eps 1e-6, class
        token, token pooling); ``num_classes=0`` makes the head an Identity, as the exported weights have none."""
        if not self.is_vit:
            raise ValueError(f"{self.arch} is not a Vision Transformer")
        return {
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "num_classes": 0,
        }

    def to_info(self) -> dict[str, Any]:
        """encoder.json's fields: ``arch``, ``small_stem``, ``feature_dim`` (as before), plus ``timm_kwargs`` for a
        ViT (what to pass to timm's ``VisionTransformer``) and the spec itself under ``backbone``."""
        info: dict[str, Any] = {"arch": self.arch, "small_stem": self.small_stem, "feature_dim": self.feature_dim}
        if self.is_vit:
            info["timm_kwargs"] = self.timm_kwargs()
            info["backbone"] = asdict(self)
        return info

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> BackboneSpec:
        """Back from :meth:`to_info`; files written before ViTs (``arch`` + ``small_stem`` only) still read."""
        if isinstance(info.get("backbone"), dict):
            return cls(**info["backbone"])
        return cls.resolve(str(info["arch"]), bool(info.get("small_stem", False)))


def as_spec(arch: str | BackboneSpec, small_stem: bool = False) -> BackboneSpec:
    """A spec from either a spec or the older (arch, small_stem) pair, which still names every ResNet (and a ViT at
    its own, 224 px, size)."""
    return arch if isinstance(arch, BackboneSpec) else BackboneSpec.resolve(arch, small_stem)
