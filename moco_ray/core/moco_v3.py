"""MoCo v3 (Chen, Xie, He 2021), ResNet and ViT: predictor on the query side, in-batch keys, no queue."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from moco_ray.core.backbone_spec import BackboneSpec, as_spec
from moco_ray.core.distributed import all_gather_nograd, rank
from moco_ray.core.encoders import Encoder, build_backbone, build_mlp_head
from moco_ray.core.loss import contrastive_accuracy
from moco_ray.core.method import QueryEncoderMethod, StepOutput
from moco_ray.core.momentum import momentum_update


class QueryEncoder(Encoder):
    """Backbone -> projector (``head``) -> ``predictor``; ``forward`` returns the predictor output.

    The predictor lives inside the query encoder so that DDP, which wraps only ``encoder_q``, reduces its
    gradients too. The state-dict keys of backbone and projector are those of :class:`Encoder`.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, predictor: nn.Module) -> None:
        super().__init__(backbone, head)
        self.predictor = predictor

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Projector output (what the momentum encoder computes), without the predictor."""
        return self.head(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.project(x))


def build_query_encoder(
    arch: str | BackboneSpec,
    small_stem: bool,
    dim: int = 256,
    hidden_dim: int = 4096,
    pred_hidden_dim: int = 4096,
    proj_layers: int = 2,
    norm_layer=None,
    zero_init_residual: bool = True,
) -> QueryEncoder:
    """The official heads (facebookresearch/moco-v3 ``moco/builder.py``, ``_build_projector_and_predictor_mlps``).

    ResNet (``MoCo_ResNet``): projector ``proj_layers``-layer MLP (official: 2), hidden width ``hidden_dim``
    (``--moco-mlp-dim`` 4096), BN after every hidden Linear, ending in BN without affine; predictor 2 layers,
    hidden ``pred_hidden_dim`` (4096), no BN after its last Linear. ``zero_init_residual`` as the official ResNet
    (``torchvision_models.__dict__[arch](zero_init_residual=True)``).
    ViT (``MoCo_ViT``): the projector reads the class token (official: 3 layers, set by ``proj_layers``) and the
    predictor ends in BN without affine too (``_build_mlp(2, dim, mlp_dim, dim)``, last_bn defaulting to True).
    No Linear has a bias. ``hidden_dim=0`` = backbone feature width.
    """
    spec = as_spec(arch, small_stem)
    backbone, feat = build_backbone(spec, norm_layer=norm_layer, zero_init_residual=zero_init_residual)
    projector = build_mlp_head(feat, hidden_dim or feat, dim, num_layers=proj_layers, last_bn=True)
    predictor = build_mlp_head(dim, pred_hidden_dim, dim, num_layers=2, last_bn=spec.is_vit, hidden_bn=True)
    return QueryEncoder(backbone, projector, predictor)


def ctr_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MoCo v3's contrastive loss: CE(q_n @ all_gather(k_n)^T / T, arange(N) + N * rank) * 2T.

    q: [N, D] query predictions (with gradient), k: [N, D] keys (no gradient; gathered from every worker, so the
    negatives are the whole global batch). The 2T factor makes the gradient scale independent of T, as in the
    paper. fp32 logits whatever the autocast dtype. Returns (loss, logits, labels).
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        q = F.normalize(q.float(), dim=1)
        k = all_gather_nograd(F.normalize(k.detach().float(), dim=1))
        logits = q @ k.t() / temperature
        n = logits.shape[0]
        labels = torch.arange(n, device=logits.device) + n * rank()
        return F.cross_entropy(logits, labels) * (2 * temperature), logits, labels


class MoCoV3(QueryEncoderMethod):
    """MoCo v3: symmetric ``ctr(q1, k2) + ctr(q2, k1)``; keys from the momentum encoder of the other view.

    ``encoder_q`` (a :class:`QueryEncoder`) is the only part that takes gradients; ``encoder_k`` is an EMA copy of
    its backbone + projector (no predictor), updated first thing in ``forward`` as in the official code. The paper
    raises m from 0.99 to 1 with a cosine schedule over training: the training loop sets ``self.momentum`` before
    each step (``train.schedule.momentum_at``, ``moco.momentum_schedule: cosine``).
    There is no queue (``queue`` is None): the negatives are the other keys of the global batch.
    """

    def __init__(
        self, encoder_q: QueryEncoder, momentum: float = 0.99, temperature: float = 1.0, symmetric: bool = True
    ) -> None:
        super().__init__()
        self.encoder_q = encoder_q
        self.encoder_k = Encoder(copy.deepcopy(encoder_q.backbone), copy.deepcopy(encoder_q.head))
        self.encoder_k.requires_grad_(False)
        self.momentum: float = momentum
        self.queue = None
        self.T, self.symmetric = temperature, symmetric

    @torch.no_grad()
    def momentum_update(self) -> None:
        q = self.query_module
        momentum_update(self.encoder_k.backbone, q.backbone, self.momentum)
        momentum_update(self.encoder_k.head, q.head, self.momentum)

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> StepOutput:
        """EMA update, then the loss. Returns ``loss`` and ``acc1`` (top-1 of the positive among global keys)."""
        self.momentum_update()
        q1 = self.encoder_q(im_q)
        with torch.no_grad():
            k2 = self.encoder_k(im_k)
        loss, logits, labels = ctr_loss(q1, k2, self.T)
        acc1 = contrastive_accuracy(logits, labels)
        if self.symmetric:
            q2 = self.encoder_q(im_k)
            with torch.no_grad():
                k1 = self.encoder_k(im_q)
            loss21, logits21, _ = ctr_loss(q2, k1, self.T)
            loss = loss + loss21
            acc1 = (acc1 + contrastive_accuracy(logits21, labels)) / 2
        return {"loss": loss, "acc1": acc1}
