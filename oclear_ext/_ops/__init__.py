"""Python side of each op: fake kernels, autograd, public wrappers.

Importing this package loads the compiled kernels (oclear_ext._C), with a readable error when they are
missing or were built for another torch; every module that uses an op imports it through here.
"""

from .._extension import load_extension

build_info = load_extension()
