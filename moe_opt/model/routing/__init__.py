"""Routing for timed fused-MoE calls: which experts each token's topk slots go to, and with what weights.

Three kinds, named by a :class:`RoutingSpec` (spec.py):

- ``uniform``: a real top-k over random softmaxed logits, every expert equally likely (moe_opt's routing so far);
- ``zipf``: expert popularity falls off as 1/r^s with the popularity rank r, for users without traces;
- ``trace``: expert ids recorded from a model run (trace.py, :func:`load_trace`: SGLang's dumps, or plain .pt / .npy
  arrays).

A draw is ``(topk_weights, topk_ids)``: (M, topk) float32 and (M, topk) int32, both contiguous, on the device asked
for, drawn from a ``torch.Generator`` of that device. The weights only scale each slot's output and do not change
the kernel's work, so every kind draws them at random. docs/routing.md says when to use which.

torch and numpy are imported inside the functions, so importing this module costs nothing.
"""

from .draws import check_exponent, uniform_routing, zipf_routing
from .spec import KINDS, RoutingSpec
from .trace import RoutingTrace, load_trace, trace_digest

__all__ = ["KINDS", "RoutingSpec", "RoutingTrace", "check_exponent", "load_trace", "trace_digest", "uniform_routing",
           "zipf_routing"]
