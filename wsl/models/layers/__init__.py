"""Building blocks shared by the models: pooling heads and map geometry."""
from wsl.models.layers.geometry import conv_geometry, maps_to_pixels, resample_maps
from wsl.models.layers.pooling import POOLINGS, build_pooling

__all__ = ["POOLINGS", "build_pooling", "conv_geometry", "maps_to_pixels", "resample_maps"]
