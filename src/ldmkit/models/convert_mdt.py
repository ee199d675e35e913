"""MDT-v2 weights to and from the original layout (sail-sg/MDT ``MDTv2``): its four block lists
(``en_inblocks``, ``en_outblocks``, ``sideblocks``, ``decoder_blocks``...) map onto ldmkit's one ``blocks``
list; every other name is the same."""

from __future__ import annotations

import torch
from torch import Tensor

from ldmkit.models.mdt import MDT, relative_position_index


def _block_names(half_depth: int, decode_layer: int) -> list[str]:
    """Original prefix of each of our ``blocks.j``, in order."""
    return (
        [f"en_inblocks.{i}" for i in range(half_depth)]
        + [f"en_outblocks.{i}" for i in range(half_depth)]
        + ["sideblocks.0"]
        + [f"de_blocks.{i}" for i in range(decode_layer)]
    )


def from_original_state_dict(state_dict: dict[str, Tensor], half_depth: int, decode_layer: int) -> dict[str, Tensor]:
    """Rename a sail-sg/MDT ``MDTv2`` state dict to ours (``model.load_state_dict(..., strict=True)``).

    ``half_depth = (depth - decode_layer) / 2``. The stored ``relative_position_index`` buffers are
    checked against ours and dropped (ours are recomputed)."""
    names = _block_names(half_depth, decode_layer)
    prefix_map = {f"{name}.": f"blocks.{j}." for j, name in enumerate(names)}
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith("attn.rel_pos_bias.relative_position_index"):
            n = value.shape[0]
            g = round(n**0.5)
            if g * g != n or not torch.equal(value.cpu(), relative_position_index(g, g)):
                raise ValueError(f"from_original_state_dict: unexpected relative_position_index in {key!r}")
            continue
        for old, new in prefix_map.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        else:
            if key.split(".")[0] in ("en_inblocks", "en_outblocks", "sideblocks", "de_blocks"):
                raise ValueError(
                    f"from_original_state_dict: {key!r} does not fit half_depth={half_depth}, "
                    f"decode_layer={decode_layer}"
                )
        out[key] = value
    return out


def to_original_state_dict(model: MDT) -> dict[str, Tensor]:
    """Our state dict under the original's key names (index buffers included, as the original stores)."""
    names = _block_names(model.half_depth, model.decode_layer)
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith("blocks."):
            _, j, rest = key.split(".", 2)
            key = f"{names[int(j)]}.{rest}"
        out[key] = value
    for j, blk in enumerate(model.blocks):
        out[f"{names[j]}.attn.rel_pos_bias.relative_position_index"] = blk.attn.rel_pos_bias.relative_position_index
    return out
