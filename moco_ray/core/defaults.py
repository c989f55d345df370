"""The MoCo core's own defaults and constants, in one place (plain Python: the config layer reads them too).

Defaults are those of the MoCo papers' ImageNet recipes; the method presets and experiment files in
``moco_ray.config`` / ``experiments/`` set everything else. Nothing here imports torch.
"""

from __future__ import annotations

# torchvision backbones moco-ray builds, and the width of their pooled features (fc removed)
FEATURE_DIMS: dict[str, int] = {
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "resnet101": 2048,
    "resnet152": 2048,
    "wide_resnet50_2": 2048,
    "vit_small": 384,
    "vit_base": 768,
}
ARCHS: tuple[str, ...] = tuple(FEATURE_DIMS)
# Vision Transformers as facebookresearch/moco-v3 vits.py builds them (all: mlp_ratio 4, qkv_bias True, LayerNorm
# eps 1e-6, 224 px). vit_small has 12 heads there (timm's own vit_small_patch16_224 has 6).
VIT_ARCHS: dict[str, dict[str, int]] = {
    "vit_small": {"patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 12},  # vits.vit_small
    "vit_base": {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12},  # vits.vit_base
}

# MoCo v1/v2 on ImageNet (facebookresearch/moco main_moco.py: --moco-k 65536, --moco-m 0.999, --moco-t 0.07;
# the v2 recipe passes --moco-t 0.2, which the moco_v2 preset sets). The CIFAR demo's K 4096 / m 0.99 / T 0.1 are
# set by experiments/cifar10_mocov2_r18.yaml.
QUEUE_SIZE = 65536  # K
MOMENTUM = 0.999  # m of the key encoder's EMA
TEMPERATURE = 0.07  # T of InfoNCE
EMBED_DIM = 128  # output width of the projection head (--moco-dim 128)
BN_SPLITS = 8  # SplitBatchNorm groups (official CIFAR demo)

# Weighted kNN monitor (official CIFAR demo: k 200, T 0.1)
KNN_K = 200
KNN_T = 0.1

# Channel statistics the torchvision ImageNet models were trained with (0-1 scale)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# CIFAR-10 statistics as the official MoCo CIFAR-10 demo (moco_cifar10_demo) normalises with
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2023, 0.1994, 0.2010)


def feature_dim(arch: str) -> int:
    """Pooled feature width of ``arch``; ValueError naming the known ones."""
    if arch not in FEATURE_DIMS:
        raise ValueError(f"model.arch: unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    return FEATURE_DIMS[arch]
