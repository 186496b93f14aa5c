"""Exceptions raised by million_cupy.

Every error names what was expected and what arrived, and is raised before any
cache or pool state changes.
"""


class MillionError(Exception):
    """Base class of every million_cupy error."""


class PagePoolExhausted(MillionError, MemoryError):
    """The page pool has fewer free pages than requested; nothing was allocated."""


class SequenceSlotsExhausted(MillionError, RuntimeError):
    """Every sequence slot of a cache is in use (max_seqs); free a sequence first. Nothing changed."""


class InvalidPageOperation(MillionError, ValueError):
    """Double free, free of an unallocated page, or a page id out of range; the pool is unchanged."""


class UnsupportedConfiguration(MillionError, ValueError):
    """No native kernel exists for the requested shapes / dtypes."""


class CodebookFormatError(MillionError, ValueError):
    """A codebook file is truncated, corrupt, or does not match what was expected."""


class DeviceUnavailable(MillionError, RuntimeError):
    """GPU work was requested but CuPy or a CUDA device is not usable."""
