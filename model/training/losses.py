"""Masked segmentation losses: labels only count where the scene has data and a class."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy averaged over ``mask`` pixels (weighted mean when classes are weighted).

    ``logits`` (N, K, H, W), ``labels`` (N, H, W) int64, ``mask`` (N, H, W) bool.
    """
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    per_pixel = F.cross_entropy(logits, safe, reduction="none")
    weights = mask.to(logits.dtype)
    if class_weights is not None:
        weights = weights * class_weights.to(logits.dtype)[safe]
    return (per_pixel * weights).sum() / weights.sum().clamp_min(1e-12)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 2.0,
) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened class distributions, mean over ``mask``.

    Scaled by T^2 so its gradients keep the same size as the cross-entropy's when T changes
    (Hinton et al., 2015). Zero exactly when the two sets of logits agree up to a constant.
    """
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    per_pixel = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)
    weights = mask.to(per_pixel.dtype)
    return temperature**2 * (per_pixel * weights).sum() / weights.sum().clamp_min(1e-12)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    temperature: float = 2.0,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``ce_weight * CE(labels) + kd_weight * T^2 KL(teacher || student)`` on valid pixels."""
    loss = student_logits.new_zeros(())
    if ce_weight:
        loss = loss + ce_weight * masked_cross_entropy(student_logits, labels, mask, class_weights)
    if kd_weight:
        loss = loss + kd_weight * kd_loss(student_logits, teacher_logits, mask, temperature)
    return loss
