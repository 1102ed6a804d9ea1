"""The language-modelling loss of an MLLM on (image, prompt) -> text, as `Captioner` prompts it.

The demo's world models (pipelines/synthetic.py) are tiny MLLMs taught the synthetic
world's captions and target descriptions with this loss, so that they play the part
pretrained Qwen2.5-VL plays in production. The rows are the Captioner's own prompt
(a user turn with the image and the prompt, then the assistant header), followed by
the target text and the end token; only the target's tokens (end token included) are
scored, so that the model learns to answer and to stop.
"""
from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from model.mllm import MLLM, _user_turn


def caption_loss(
    mllm: MLLM, images: Sequence[Image.Image | None], prompts: Sequence[str], targets: Sequence[str],
    image_keys: Sequence | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy of each target given its image and prompt;
    image_keys as `MLLM.encode`'s (rows met again reuse their processed prompt)."""
    conversations = [[_user_turn(im, p)] for im, p in zip(images, prompts)]
    batch = mllm.encode(conversations, [im for im in images if im is not None], add_generation_prompt=True,
                        image_keys=image_keys)
    tok = mllm.tokenizer
    answers = [tok(t + tok.eos_token, add_special_tokens=False)["input_ids"] for t in targets]
    rows, width = len(answers), max(len(a) for a in answers)
    prompt_ids = batch["input_ids"]
    # The prompts are left-padded, so that every answer starts at the same column; the
    # answers are right-padded after it (masked, and not scored).
    answer_ids = torch.full((rows, width), tok.pad_token_id, dtype=prompt_ids.dtype)
    labels = torch.full((rows, width), -100, dtype=prompt_ids.dtype)
    mask = torch.zeros((rows, width), dtype=batch["attention_mask"].dtype)
    for r, a in enumerate(answers):
        answer_ids[r, : len(a)] = torch.tensor(a)
        labels[r, : len(a)] = torch.tensor(a)
        mask[r, : len(a)] = 1
    device = prompt_ids.device
    extended = {}
    for key, value in batch.items():
        if key == "input_ids":
            extended[key] = torch.cat([value, answer_ids.to(device)], dim=1)
        elif key == "attention_mask":
            extended[key] = torch.cat([value, mask.to(device)], dim=1)
        elif torch.is_tensor(value) and value.shape == prompt_ids.shape:
            # Per-token inputs besides the ids (Qwen's mm_token_type_ids): text, so 0.
            extended[key] = torch.cat([value, value.new_zeros((rows, width))], dim=1)
        else:
            extended[key] = value
    # Only the answer's columns are scored, so only they (and the prompt's last column,
    # which predicts the answer's first token) go through the vocabulary projection and
    # its softmax; the labels are those columns', unscored first.
    keep = width + 1
    labels = torch.cat([torch.full((rows, 1), -100, dtype=labels.dtype), labels], dim=1).to(device)
    return mllm.model(**extended, labels=labels, logits_to_keep=keep, use_cache=False).loss
