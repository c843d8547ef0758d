"""Backbones and heads: the official-DINO ViT (tiny/small/base) and DINOHead."""
from fastdino.models.attention import PackedSequences, attention, resolve_attention_backend
from fastdino.models.head import DINOHead
from fastdino.models.vit import VisionTransformer, vit_base, vit_small, vit_tiny

__all__ = ["VisionTransformer", "vit_tiny", "vit_small", "vit_base", "DINOHead", "attention",
           "resolve_attention_backend", "PackedSequences"]
