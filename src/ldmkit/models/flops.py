"""Forward FLOPs of a model counted by PyTorch's FlopCounterMode: the reference for the closed forms of
``models.cost`` and the count behind the trainer's MFU.

Counted: matrix products (mm, bmm, addmm, baddbmm) and convolutions, a multiply-add counting 2, with
attention written out as matrix products; element-wise work (norms, activations, softmax) is not counted.
Run on a meta-device model it costs no memory and no compute, but still seconds for a large model.
"""

from __future__ import annotations

import torch
from torch import nn

from ldmkit.conditioning import Conditioning


def forward_flops_per_image(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> float:
    """FLOPs of one forward pass on one image (counted on a batch of 1)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    # The math backend spells attention out as matmuls, which every device counts (the fused CPU
    # kernel has no FLOP formula and would count as zero).
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), counter:
        model(x[:1], t[:1], cond.index(slice(0, 1)))
    return float(counter.get_total_flops())
