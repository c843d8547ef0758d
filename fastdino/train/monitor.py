"""Collapse monitor.

DINO fails silently by collapsing: every output uniform (teacher entropy at ln K,
the loss stuck at ln K), or every image on one prototype, or backbone features
that no longer vary across images. These statistics are computed on logging
steps only (they need the full softmax and a host sync).
"""
from __future__ import annotations

import math

import torch


@torch.no_grad()
def collapse_stats(student_logits: torch.Tensor, teacher_logits: torch.Tensor, center: torch.Tensor,
                   student_temp: float, teacher_temp: float, teacher_features: torch.Tensor) -> dict:
    teacher_probs = torch.softmax((teacher_logits.float() - center.view(1, -1)) / teacher_temp, dim=-1)
    student_log_probs = torch.log_softmax(student_logits.float() / student_temp, dim=-1)
    teacher_entropy = -(teacher_probs * torch.log(teacher_probs.clamp_min(1e-30))).sum(-1).mean()
    student_entropy = -(student_log_probs.exp() * student_log_probs).sum(-1).mean()
    stats = {
        "log_k": math.log(teacher_logits.shape[-1]),
        "teacher_entropy": teacher_entropy,
        "student_entropy": student_entropy,
        # Sharp but diverse teachers have a high per-image top probability; collapse
        # onto one prototype shows as one prototype holding the whole batch's mass.
        "teacher_top_prob": teacher_probs.max(-1).values.mean(),
        "dominant_prototype_share": teacher_probs.mean(0).max(),
        "feature_std": teacher_features.float().std(0).mean() if teacher_features.shape[0] > 1 else torch.zeros(()),
    }
    return {k: float(v) for k, v in stats.items()}


def collapse_warnings(stats: dict, monitor_cfg) -> list[str]:
    warnings = []
    if stats["teacher_entropy"] > monitor_cfg.entropy_warn_fraction * stats["log_k"]:
        warnings.append(f"uniform collapse: teacher entropy {stats['teacher_entropy']:.3f} ~ ln K {stats['log_k']:.3f}")
    if stats["dominant_prototype_share"] > monitor_cfg.top_prob_warn:
        warnings.append(f"one-prototype collapse: {stats['dominant_prototype_share']:.0%} of the teacher mass on one prototype")
    if stats["feature_std"] < monitor_cfg.feature_std_warn:
        warnings.append(f"feature collapse: per-dimension feature std {stats['feature_std']:.2e}")
    return warnings
