"""Hopper's tensor memory accelerator (TMA) for the GEMMs: whether the device has it, and the tensor descriptors.

SGLang's facts (kernels/ops/moe/fused_moe_triton_kernels.py, SGLang 0.5.23): descriptors are host-side
``triton.tools.tensor_descriptor.TensorDescriptor`` objects passed to the kernel (Triton 3.4+; SGLang turns TMA off
where the import fails); B of shape (E, N, K) is described with block [1, BLOCK_SIZE_N, BLOCK_SIZE_K], GEMM2's
expert-sorted A of shape (rows, N) with [BLOCK_SIZE_M, BLOCK_SIZE_K]; ``triton.set_allocator`` is set once per
process before the first TMA launch. Out-of-bounds rows and columns of a descriptor load read as zero, so a tile
past N, K or the last row needs no mask.
"""

from __future__ import annotations

import functools

import torch

from ..errors import ConfigError
from .interpret import interpreting


@functools.cache
def has_tensor_descriptors() -> bool:
    """Whether the installed Triton has host-side tensor descriptors (SGLang's support_tensor_descriptor)."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return True


def device_supports_tma(device: str | torch.device = "cuda") -> bool:
    """Whether USE_TMA can run on ``device``: a CUDA GPU of compute capability 9.0 or later (Hopper's TMA) with
    tensor descriptors in the installed Triton. False on the CPU: the interpreter runs the TMA path (tests), but the
    search space never offers it there.

    Example:
        >>> device_supports_tma("cpu")
        False
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9 and has_tensor_descriptors()


_ALLOCATOR_SET = False


def _set_allocator() -> None:
    """TMA launches need Triton's global allocator; SGLang sets it once per process (_set_triton_tma_allocator)."""
    global _ALLOCATOR_SET
    if _ALLOCATOR_SET or interpreting():
        return
    import triton

    def alloc(size: int, alignment: int, stream):
        return torch.empty(size, device="cuda", dtype=torch.int8)

    triton.set_allocator(alloc)
    _ALLOCATOR_SET = True


def descriptor_refusal(t: torch.Tensor, what: str) -> str | None:
    """Why ``t`` cannot be described for TMA (16-byte aligned base, every stride but the last a multiple of 16 bytes,
    the last dimension contiguous), or None."""
    nbytes = t.element_size()
    if t.stride(-1) != 1:
        return f"USE_TMA: {what} is not contiguous in its last dimension"
    if t.data_ptr() % 16:
        return f"USE_TMA: {what} does not start on a 16-byte boundary"
    bad = [s * nbytes for s in t.stride()[:-1] if s * nbytes % 16]
    if bad:
        return (f"USE_TMA: {what} {tuple(t.shape)} {t.dtype} has a row stride of {bad[0]} bytes, not a multiple of 16 "
                "(a tensor descriptor needs it)")
    return None


def descriptor(t: torch.Tensor, block_shape: list[int], what: str):
    """A TensorDescriptor over the whole of ``t`` loading ``block_shape`` tiles; a ConfigError says why not."""
    if not interpreting() and not device_supports_tma(t.device):
        raise ConfigError(f"USE_TMA needs a CUDA GPU of compute capability 9.0+ (Hopper's TMA) and Triton tensor "
                          f"descriptors; {t.device} has none")
    if not has_tensor_descriptors():
        raise ConfigError("USE_TMA needs triton.tools.tensor_descriptor (Triton 3.4+), which this Triton lacks")
    why = descriptor_refusal(t, what)
    if why is not None:
        raise ConfigError(why)
    from triton.tools.tensor_descriptor import TensorDescriptor

    _set_allocator()
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block_shape)
