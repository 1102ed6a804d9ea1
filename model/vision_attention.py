"""One attention call per layer for all the images of a batch in a Qwen-VL vision tower.

Qwen2-VL and Qwen2.5-VL pack the patches of every image of a batch into one sequence and
mark where each image (or, in Qwen2.5-VL's window layers, each window) starts with
`cu_seqlens`. Under flash_attention_2 one varlen call attends within each segment; under
sdpa or eager transformers splits the sequence and calls attention once per segment,
after a `.tolist()` host sync, in every layer: 128 images x 32 layers is 4,096 small
calls and 32 syncs per batch, which kept GME's vision tower Python-bound on an H100
(docs/benchmarks.md). flash-attn cannot be installed everywhere we run, so this module
gives the same block-diagonal attention with kernels PyTorch ships:

- "padded": the segments gathered into a (segments, heads, longest, head_dim) batch and
  one `scaled_dot_product_attention` call whose mask hides the padding keys (no mask at
  all when every segment has the same length, as with same-sized images);
- "flex": `flex_attention` over the packed sequence with a document mask (no padding;
  compiled into one fused kernel on CUDA, an unfused reference on CPU).

The segment layout is worked out once per `cu_seqlens` tensor (one host sync per
forward, not per layer) and shared by every layer. "per_image" leaves transformers' own
module in place. Weights and state-dict keys are unchanged: the packed module holds the
original `qkv` and `proj`.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

VISION_ATTENTION = ("per_image", "padded", "flex")


@dataclass
class SegmentLayout:
    """Where each segment of a packed sequence sits, computed once per `cu_seqlens`."""

    lengths: list[int]
    # (segments, longest): the packed position of each padded slot (0 for padding).
    gather: torch.Tensor
    # (segments, longest): True where a slot holds a real token.
    valid: torch.Tensor
    # Indices of the real slots in the flattened (segments * longest) grid, in packed order.
    flat_real: torch.Tensor
    # (packed,): the segment of each packed token, for flex's document mask.
    segment_of: torch.Tensor
    block_mask: object | None = None

    @property
    def uniform(self) -> bool:
        return len(set(self.lengths)) == 1

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor) -> SegmentLayout:
        device = cu_seqlens.device
        lengths_t = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        lengths = lengths_t.tolist()  # the one host sync of a forward
        longest = max(lengths)
        slots = torch.arange(longest, device=device)
        valid = slots[None, :] < lengths_t[:, None]
        gather = torch.where(valid, cu_seqlens[:-1, None] + slots[None, :], 0)
        flat_real = valid.flatten().nonzero().squeeze(1)
        segment_of = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths_t)
        return cls(lengths, gather, valid, flat_real, segment_of)


class LayoutCache:
    """The layouts of the `cu_seqlens` tensors of the current forward, shared by all layers.

    A tower passes the very same tensor to each of its layers (Qwen2.5-VL alternates two:
    windows and whole images), so identity is the key; the tensor is held so its id is
    not reused while cached.
    """

    def __init__(self, size: int = 2):
        self.size = size
        self.entries: list[tuple[torch.Tensor, SegmentLayout]] = []

    def get(self, cu_seqlens: torch.Tensor) -> SegmentLayout:
        for tensor, layout in self.entries:
            if tensor is cu_seqlens:
                return layout
        layout = SegmentLayout.from_cu_seqlens(cu_seqlens)
        self.entries = [(cu_seqlens, layout)] + self.entries[: self.size - 1]
        return layout


_compiled_flex = None


def _flex(q, k, v, block_mask, scale):
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled_flex
    if q.is_cuda:
        if _compiled_flex is None:
            # Dynamic: the packed length changes with every batch of images.
            _compiled_flex = torch.compile(flex_attention, dynamic=True)
        return _compiled_flex(q, k, v, block_mask=block_mask, scale=scale)
    with warnings.catch_warnings():
        # Off CUDA flex runs its unfused reference (it says so on every call).
        warnings.simplefilter("ignore", UserWarning)
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale)


class PackedVisionAttention(nn.Module):
    """A Qwen-VL `VisionAttention` computing all segments in one call (see the module doc).

    Same signature as the module it replaces; `qkv`, `proj`, `num_heads`, `scaling` and
    the rotary function are the original's.
    """

    def __init__(self, original: nn.Module, mode: str, layouts: LayoutCache):
        super().__init__()
        if mode not in ("padded", "flex"):
            raise ValueError(f"vision_attention={mode!r}: expected padded or flex")
        self.qkv = original.qkv
        self.proj = original.proj
        self.num_heads = original.num_heads
        self.scaling = original.scaling
        self.mode = mode
        self.layouts = layouts
        # The rotary embedding of the model's own family (Qwen2-VL and Qwen2.5-VL differ).
        self.apply_rotary = sys.modules[type(original).__module__].apply_rotary_pos_emb_vision
        # In a list so that it is not a second copy of the weights in the state dict.
        self.original = [original]

    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
        tokens = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(tokens, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        q, k = self.apply_rotary(q, k, cos, sin)
        layout = self.layouts.get(cu_seqlens)
        if self.mode == "flex":
            out = self._flex(q, k, v, layout)
        else:
            out = self._padded(q, k, v, layout)
        return self.proj(out.reshape(tokens, -1))

    def _padded(self, q, k, v, layout: SegmentLayout) -> torch.Tensor:
        segments, longest = layout.gather.shape
        if layout.uniform:
            # Same-sized segments: a plain batch, no mask (the fastest sdpa kernels).
            qb, kb, vb = (t.reshape(segments, longest, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(qb, kb, vb, scale=self.scaling)
            return out.transpose(1, 2).reshape(segments * longest, -1)
        # Padding slots repeat token 0 and are masked as keys; their outputs are dropped.
        qb, kb, vb = (t[layout.gather].transpose(1, 2) for t in (q, k, v))
        mask = layout.valid[:, None, None, :]
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=self.scaling)
        return out.transpose(1, 2).reshape(segments * longest, -1).index_select(0, layout.flat_real)

    def _flex(self, q, k, v, layout: SegmentLayout) -> torch.Tensor:
        if layout.block_mask is None:
            from torch.nn.attention.flex_attention import create_block_mask

            segment_of = layout.segment_of

            def same_segment(b, h, q_idx, kv_idx):
                return segment_of[q_idx] == segment_of[kv_idx]

            n = segment_of.shape[0]
            layout.block_mask = create_block_mask(same_segment, None, None, n, n, device=segment_of.device)
        qb, kb, vb = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out = _flex(qb, kb, vb, layout.block_mask, self.scaling)
        return out.squeeze(0).transpose(0, 1)


class LinearPatchEmbed(nn.Module):
    """A Qwen-VL vision patch embedding as the one matrix product it is.

    The original is a Conv3d whose kernel equals its stride and covers the whole patch
    row, applied to a (patches, C, T, p, p) view of the patch rows: each output is the
    patch row times the flattened kernel. As a convolution (oneDNN's Conv3d, backward
    mostly) it cost the demo's fine-tuning step about a tenth of its time on a CPU
    (bench/finetune_step.py); as `F.linear` it is the same sums. `proj` is the original
    Conv3d, so the weights and state-dict keys are unchanged.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        self.proj = original.proj
        self.embed_dim = original.embed_dim
        self.original = [original]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight.flatten(1)
        return F.linear(hidden_states.to(weight.dtype).reshape(-1, weight.shape[1]), weight, self.proj.bias)


def linear_patch_embed(model: nn.Module) -> nn.Module:
    """Every Qwen-VL vision patch embedding of `model` as `LinearPatchEmbed`."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionPatchEmbed
    from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchEmbed

    for module in list(model.modules()):
        if isinstance(getattr(module, "patch_embed", None), (PatchEmbed, Qwen2_5_VisionPatchEmbed)):
            module.patch_embed = LinearPatchEmbed(module.patch_embed)
    return model


def vision_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of the Qwen-VL vision tower(s) inside `model` (a whole MLLM or a tower)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionAttention
    from transformers.models.qwen2_vl.modeling_qwen2_vl import VisionAttention

    kinds = (VisionAttention, Qwen2_5_VLVisionAttention, PackedVisionAttention)
    return [m for m in model.modules() if isinstance(getattr(m, "attn", None), kinds)]


def set_vision_attention(model: nn.Module, mode: str) -> nn.Module:
    """Put `mode` (conf `models.<role>.vision_attention`) in every vision block of `model`."""
    if mode not in VISION_ATTENTION:
        raise ValueError(f"vision_attention={mode!r}: expected one of {', '.join(VISION_ATTENTION)}")
    blocks = vision_blocks(model)
    if not blocks and mode != "per_image":
        raise ValueError(f"vision_attention={mode!r}: {type(model).__name__} has no Qwen-VL vision tower")
    layouts = LayoutCache()
    for block in blocks:
        original = block.attn.original[0] if isinstance(block.attn, PackedVisionAttention) else block.attn
        block.attn = original if mode == "per_image" else PackedVisionAttention(original, mode, layouts)
    return model
