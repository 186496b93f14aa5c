"""million_cupy: a product-quantized paged KV cache (MILLION / PagedPQCache) with native CUDA decode kernels.

Importing the package is cheap and imports neither CuPy nor numba: the error classes are
imported eagerly, everything else on first attribute access (PEP 562).

``million_cupy.decode`` is both the submodule ``million_cupy/decode.py`` and its ``decode()``
function: the submodule is made callable, so ``million_cupy.decode(...)`` calls
``million_cupy.decode.decode(...)`` and ``million_cupy.decode.BatchDecodeWrapper`` still works,
whichever of the two was reached first. Type checkers see the function.
"""

import importlib as _importlib
import inspect as _inspect
import sys as _sys
import types as _types
from typing import TYPE_CHECKING as _TYPE_CHECKING

from .errors import (
    CodebookFormatError,
    DeviceUnavailable,
    InvalidPageOperation,
    MillionError,
    PagePoolExhausted,
    SequenceSlotsExhausted,
    UnsupportedConfiguration,
)

# Keep in step with pyproject.toml's [project] version (tests/test_package.py checks it).
__version__ = "0.2.0"

# public name -> (submodule, attribute in it; None = the submodule itself)
_LAZY: dict[str, tuple[str, str | None]] = {
    "Codebook": ("codebook", "Codebook"),
    "ModelCodebooks": ("codebook", "ModelCodebooks"),
    "PageAllocator": ("allocator", "PageAllocator"),
    "PagedPQCache": ("cache", "PagedPQCache"),
    "AppendPlan": ("cache", "AppendPlan"),
    "BatchDecodeWrapper": ("decode", "BatchDecodeWrapper"),
    "DecodeStep": ("step", "DecodeStep"),
    "BatchPrefillWrapper": ("prefill", "BatchPrefillWrapper"),
    "prefill_attention": ("prefill", "prefill_attention"),
    "SequenceParallelCache": ("parallel", "SequenceParallelCache"),
    "HeadParallelCache": ("parallel", "HeadParallelCache"),
    "decode": ("decode", None),  # the callable submodule, see _DecodeModule
    "merge_states": ("decode", "merge_states"),
    "contiguous_pq_decode": ("decode", "contiguous_pq_decode"),
    "paged_pq_decode": ("decode", "paged_pq_decode"),
    "paged_exact_decode": ("decode", "paged_exact_decode"),  # the fp16 / bf16 / fp32 paged baseline
    "reference": ("reference", None),
    "kernels": ("kernels", None),
}

if _TYPE_CHECKING:  # what type checkers see of the lazy names: their definitions (tests/test_package.py: as _LAZY)
    from . import kernels, reference
    from .allocator import PageAllocator
    from .cache import AppendPlan, PagedPQCache
    from .codebook import Codebook, ModelCodebooks
    from .decode import (BatchDecodeWrapper, contiguous_pq_decode, decode, merge_states, paged_exact_decode,
                         paged_pq_decode)
    from .parallel import HeadParallelCache, SequenceParallelCache
    from .prefill import BatchPrefillWrapper, prefill_attention
    from .step import DecodeStep

__all__ = [
    "__version__",
    # errors (eager)
    "MillionError",
    "PagePoolExhausted",
    "SequenceSlotsExhausted",
    "InvalidPageOperation",
    "UnsupportedConfiguration",
    "CodebookFormatError",
    "DeviceUnavailable",
    # lazy
    *_LAZY,
]


class _DecodeModule(_types.ModuleType):
    """Class given to the ``million_cupy.decode`` submodule: calling it calls its ``decode()`` function."""

    def __call__(self, *args, **kwargs):
        return self.decode(*args, **kwargs)


class _Package(_types.ModuleType):
    # The import system binds a submodule on its package (setattr) the first time it is imported,
    # whoever imports it; this is where million_cupy.decode becomes callable.
    def __setattr__(self, name: str, value) -> None:
        if name == "decode" and type(value) is _types.ModuleType:
            value.__class__ = _DecodeModule
            # inspect.signature / help() of million_cupy.decode describe the function it calls.
            value.__signature__ = _inspect.signature(value.decode)  # type: ignore[attr-defined]
            value.__doc__ = f"million_cupy.decode{value.__signature__}\n\n{value.decode.__doc__}\n\n{value.__doc__}"
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    module = _importlib.import_module(f"{__name__}.{module_name}")
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(__all__) | {n for n in globals() if not n.startswith("_")})
