"""Heads on fused BEV features: detection, segmentation, reconstruction."""
