"""E_text: a text -> a sequence of condition tokens and its padding mask.

The paper names a "T5 encoder" (section 4.1) and "the text branch of f_M" (section 7);
both are supported, chosen by `text_encoder.kind` in conf (see conf/base.yaml).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from transformers import AutoTokenizer, T5EncoderModel

from model.mllm import MLLM, torch_dtype


class TextEncoder:
    """Batched, padded encoding; `mask` is True on real tokens.

    kept_texts > 0 (conf train.condition_cache_texts, in the training workers): a
    training run meets the same captions every epoch and the encoder is frozen, so each
    text's tokens are kept after its first encoding (the newest kept_texts texts) and a
    batch is padded from them: the encoder's output, without its time (a quarter of a
    demo Stage 1 step). Memory: texts x tokens x dim x 4 bytes.
    """

    def __init__(self, kind: str, name_or_path: str | None, max_tokens: int, dtype: str = "float32",
                 device: str = "cpu", mllm: MLLM | None = None, kept_texts: int = 0):
        self.kind = kind
        self.max_tokens = max_tokens
        self.kept_texts = kept_texts
        self._kept: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.device = torch.device(device)
        if kind == "t5":
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            self.model = (
                T5EncoderModel.from_pretrained(name_or_path, dtype=torch_dtype(dtype)).to(self.device).eval()
            )
            self.dim = self.model.config.d_model
        elif kind == "mllm":
            if mllm is None:
                raise ValueError("text_encoder.kind=mllm needs the fused embedder's MLLM")
            self.tokenizer = mllm.tokenizer
            self.model = mllm.model
            self.dim = mllm.model.config.get_text_config().hidden_size
        else:
            raise ValueError(f"text_encoder.kind={kind!r}: expected 't5' or 'mllm'")

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kept_texts <= 0:
            return self._encode(texts)
        texts = list(texts)
        fresh = [t for t in dict.fromkeys(texts) if t not in self._kept]
        rows = {}
        if fresh:
            tokens, mask = self._encode(fresh)
            rows = {t: tokens[i, mask[i]] for i, t in enumerate(fresh)}
        for t in texts:
            if t in self._kept:
                rows[t] = self._kept[t]
                self._kept.move_to_end(t)
        for t in fresh:
            self._kept[t] = rows[t]
            if len(self._kept) > self.kept_texts:
                self._kept.popitem(last=False)
        # Right-padded with zeros, as _encode pads: the same tensors a batch encoding gives.
        lens = [rows[t].shape[0] for t in texts]
        out = torch.zeros(len(texts), max(lens, default=0), self.dim, device=self.device)
        mask = torch.zeros(len(texts), max(lens, default=0), dtype=torch.bool, device=self.device)
        for i, (t, n) in enumerate(zip(texts, lens)):
            out[i, :n], mask[i, :n] = rows[t], True
        return out, mask

    def _encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        # Right padding here: the condition is consumed through a key padding mask, so
        # where the padding sits does not matter, and T5 is trained right-padded.
        batch = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
            padding_side="right",
        ).to(self.device)
        if self.kind == "t5":
            hidden = self.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state
        else:
            out = self.model.model.language_model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            )
            hidden = out.last_hidden_state
        mask = batch["attention_mask"].bool()
        return hidden.float() * mask.unsqueeze(-1), mask


def text_encoder_dim(text_encoder: dict, embedder: dict) -> int:
    """The condition size the prior is built for, read from the encoder's config alone
    (no weights loaded): T5's d_model, or the fused embedder's hidden size."""
    from transformers import AutoConfig

    if text_encoder["kind"] == "mllm":
        return AutoConfig.from_pretrained(embedder["name_or_path"]).get_text_config().hidden_size
    return AutoConfig.from_pretrained(text_encoder["name_or_path"]).d_model


def load_text_encoder_from_conf(text_encoder: dict, embedder: dict, device: str | None = None,
                                kept_texts: int = 0) -> TextEncoder:
    """conf `models.text_encoder` (and `models.embedder`, whose MLLM is the encoder when
    kind is mllm); kept_texts: see TextEncoder."""
    from model.mllm import load_mllm_from_conf

    mllm = None
    if text_encoder["kind"] == "mllm":
        mllm = load_mllm_from_conf({**embedder, **({"device": device} if device else {})})
    return TextEncoder(
        text_encoder["kind"],
        text_encoder["name_or_path"],
        text_encoder["max_tokens"],
        text_encoder["dtype"],
        device or text_encoder["device"],
        mllm=mllm,
        kept_texts=kept_texts,
    )


def text_encoder_name(text_encoder: dict, embedder: dict) -> str:
    """What wrote a condition: the T5 checkpoint, or the embedder whose text branch encodes."""
    return text_encoder["name_or_path"] if text_encoder["kind"] == "t5" else embedder["name_or_path"]
