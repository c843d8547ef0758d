"""Evaluation of frozen backbones: weighted k-NN accuracy and attention-map pictures."""
from fastdino.eval.attention_maps import (last_attention_maps, patch_pca_rgb, save_attention_figure,
                                          threshold_attention)
from fastdino.eval.knn import eval_mode, extract_features, knn_classify

__all__ = ["extract_features", "knn_classify", "eval_mode", "last_attention_maps", "threshold_attention",
           "patch_pca_rgb", "save_attention_figure"]
