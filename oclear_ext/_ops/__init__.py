"""Python side of each op: fake kernels, autograd, public wrappers."""
