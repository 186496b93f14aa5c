"""Shared test set-up: the `gpu` marker and CPU-side numba simulation.

GPU tests carry ``@pytest.mark.gpu`` and skip (with the reason) where no CUDA device is usable.
On a machine without a CUDA driver, million_cupy runs its numba-cuda page allocator under
numba's CUDA simulator (see million_cupy.allocator), so CPU tests exercise the same kernels.
"""

import zlib

import numpy as np
import pytest

from million_cupy.interop import gpu_available


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device usable through CuPy (none found)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng(request):
    """A fresh, reproducible-per-test random generator (seeded from the test's name)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)
