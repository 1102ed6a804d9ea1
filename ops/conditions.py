"""Text conditions c = E_text(T) as table columns, and back as padded token tensors.

A condition is a variable-length sequence of tokens: stored flattened (len x dim floats
in one list<float32> cell) with its length, so a Lance table holds it without padding.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from model.text_encoder import TextEncoder, load_text_encoder_from_conf

COND_FIELDS = [pa.field("cond_tokens", pa.list_(pa.float32())), pa.field("cond_len", pa.int32())]


def conditions_to_arrow(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[pa.Array, pa.Array]:
    """(B, K, D) tokens and their mask -> (flattened real tokens per row, their counts)."""
    lens = mask.sum(1).tolist()
    tokens = tokens.float().cpu()  # the encoder's output may live on a GPU
    flat = [tokens[i, :n].reshape(-1).numpy() for i, n in enumerate(lens)]
    return pa.array(flat, type=pa.list_(pa.float32())), pa.array(lens, type=pa.int32())


def conditions_from_columns(cond_tokens, cond_len, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of conditions_to_arrow on a numpy batch: (B, K_max, D) tokens and mask."""
    lens = [int(n) for n in cond_len]
    k = max(lens) if lens else 0
    out = torch.zeros(len(lens), k, dim)
    mask = torch.zeros(len(lens), k, dtype=torch.bool)
    for i, (flat, n) in enumerate(zip(cond_tokens, lens)):
        flat = np.asarray(flat, dtype=np.float32)
        if flat.size != n * dim:
            raise ValueError(f"a stored condition has {flat.size} values, expected {n} tokens x {dim}: "
                             f"it was written by another text encoder; rerun its stage")
        out[i, :n] = torch.from_numpy(flat.reshape(n, dim))
        mask[i, :n] = True
    return out, mask


class ConditionOp:
    """Loads the text encoder once (per Ray actor); adds cond_tokens and cond_len for `text_column`."""

    def __init__(self, conf: dict, tables=None, text_column: str = "text"):
        models = conf["models"]
        self.encoder: TextEncoder = load_text_encoder_from_conf(models["text_encoder"], models["embedder"])
        self.text_column = text_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column(self.text_column).to_pylist()
        tokens, mask = self.encoder.encode([t or "" for t in texts])
        flat, lens = conditions_to_arrow(tokens, mask)
        return batch.append_column(COND_FIELDS[0], flat).append_column(COND_FIELDS[1], lens)
