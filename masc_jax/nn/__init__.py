"""The networks: the VGG-style backbone and head, their convolution kernels and the per-layer tuning."""
