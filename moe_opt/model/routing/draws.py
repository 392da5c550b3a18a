"""Drawing the routing of timed fused-MoE calls: uniform (a real top-k over random softmaxed logits, moe_opt's
routing so far) and Zipf-skewed expert popularity. A draw is ``(topk_weights, topk_ids)``: (M, topk) float32 and
(M, topk) int32, both contiguous, on the device asked for, drawn from a ``torch.Generator`` of that device.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any

from ...errors import TuneError

if TYPE_CHECKING:
    import torch


def _check_counts(**counts: Any) -> None:
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TuneError(f"{name} must be a positive integer, got {value!r}")


def _check_shape(M: int, E: int, topk: int) -> None:
    _check_counts(M=M, E=E, topk=topk)
    if topk > E:
        raise TuneError(f"topk {topk} must be at most E {E}: a token's experts are distinct")


def _on_device(generator: torch.Generator, device: str | torch.device) -> torch.device:
    import torch

    device = torch.device(device)
    if generator.device.type != device.type:
        raise TuneError(f"the generator is on {generator.device} but routing is drawn on {device}: "
                        "give a torch.Generator(device=...) of the same device")
    return device


def _random_weights(M: int, topk: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Softmax of random logits over a token's topk slots, sorted descending (a router's renormalized weights)."""
    import torch

    logits = torch.randn(M, topk, generator=generator, device=device, dtype=torch.float32)
    return logits.softmax(-1).sort(dim=-1, descending=True).values.contiguous()


def uniform_routing(M: int, E: int, topk: int, generator: torch.Generator,
                    device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every expert equally likely: a real top-k over the softmax of random float32 logits (M, E).

    The draw is the one moe_opt's MoeInputs made: the same generator state gives the same tensors.

    Example:
        >>> import torch
        >>> weights, ids = uniform_routing(4, 8, 2, torch.Generator().manual_seed(0), "cpu")
        >>> weights.shape, weights.dtype, ids.dtype
        (torch.Size([4, 2]), torch.float32, torch.int32)
    """
    import torch

    _check_shape(M, E, topk)
    device = _on_device(generator, device)
    logits = torch.randn(M, E, generator=generator, device=device, dtype=torch.float32)
    weights, ids = logits.softmax(-1).topk(topk, dim=-1)
    return weights.contiguous(), ids.to(torch.int32).contiguous()


def check_exponent(exponent: Any) -> float:
    """The Zipf exponent as a float, or a TuneError: it must be a finite number >= 0."""
    if (isinstance(exponent, bool) or not isinstance(exponent, numbers.Real) or not math.isfinite(exponent)
            or exponent < 0):
        raise TuneError(f"zipf exponent must be a finite number >= 0 (0 = every expert equally popular), "
                        f"got {exponent!r}")
    return float(exponent)


def zipf_routing(M: int, E: int, topk: int, exponent: float, generator: torch.Generator,
                 device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Skewed popularity: the expert of popularity rank r (1 = most popular) has weight 1/r^exponent; each token
    draws topk distinct experts without replacement in proportion to those weights.

    Which expert holds which rank is a random permutation drawn from the generator at every call: each timed call
    stands for another layer, whose popular experts are others (and the calls share one set of weights, so one
    fixed hot set would stay in L2 from call to call). The weights are a softmax of random logits over the
    chosen slots, sorted descending.

    Example:
        >>> import torch
        >>> _, ids = zipf_routing(1000, 64, 8, 1.5, torch.Generator().manual_seed(0), "cpu")
        >>> counts = torch.bincount(ids.flatten().long(), minlength=64)
        >>> bool(counts.max() > 4 * counts.float().mean())  # the top expert takes far more than its share
        True
    """
    import torch

    s = check_exponent(exponent)
    _check_shape(M, E, topk)
    device = _on_device(generator, device)
    rank = torch.randperm(E, generator=generator, device=device) + 1
    log_popularity = -s * rank.to(torch.float32).log()
    # Gumbel-top-k: the top-k of log p + Gumbel noise has the law of k draws without replacement in proportion to
    # p (what torch.multinomial(p, k) does), and in log space no exponent underflows a popularity to zero.
    gumbel = -torch.log(-torch.log(torch.rand(M, E, generator=generator, device=device)))
    ids = (log_popularity + gumbel).topk(topk, dim=-1).indices
    return _random_weights(M, topk, generator, device), ids.to(torch.int32).contiguous()
