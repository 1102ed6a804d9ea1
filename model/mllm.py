"""The multimodal LLM (MLLM) behind captioning, target descriptions and the fused embedder f_M.

One loader (`load_mllm`) serves the demo's tiny random models and the production
checkpoints (Qwen2.5-VL-7B-Instruct, GME-Qwen2-VL-2B, ...): both are a folder or hub id
read with `from_pretrained`; only the config differs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    ProcessorMixin,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}: expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def _image_only_processor_class(processor_cls):
    """The model's processor class, built without a video processor.

    Qwen-VL processors build a video processor that needs torchvision; on machines
    without it `AutoProcessor` silently returns only the tokenizer. Images are all
    this pipeline feeds, so the video half is left out.
    """

    class ImageOnlyProcessor(processor_cls):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(
                image_processor=image_processor,
                tokenizer=tokenizer,
                video_processor=None,
                chat_template=chat_template,
                **kwargs,
            )

    return ImageOnlyProcessor


def load_processor(name_or_path: str) -> ProcessorMixin:
    processor = AutoProcessor.from_pretrained(name_or_path)
    if isinstance(processor, ProcessorMixin) and getattr(processor, "image_processor", None) is not None:
        return processor
    # Fallback described in _image_only_processor_class: rebuild from the parts.
    from transformers import Qwen2_5_VLProcessor

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    image_processor = AutoImageProcessor.from_pretrained(name_or_path)
    cls = _image_only_processor_class(Qwen2_5_VLProcessor)
    return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template)


@dataclass
class MLLM:
    """A loaded MLLM: the model, its processor, where it lives and what it is called."""

    model: torch.nn.Module
    processor: ProcessorMixin
    name: str
    device: torch.device
    image_min_pixels: int
    image_max_pixels: int

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def encode(self, conversations: Sequence[list], images: Sequence[Image.Image] | None,
               add_generation_prompt: bool, suffix: str = "") -> dict:
        """Chat conversations (+ their images, in order) to model inputs, left-padded."""
        texts = [
            self.processor.apply_chat_template(c, add_generation_prompt=add_generation_prompt, tokenize=False) + suffix
            for c in conversations
        ]
        kwargs = {}
        if images:
            kwargs["images"] = list(images)
            # Qwen-VL's pixel budget: shortest_edge/longest_edge hold min/max pixels.
            kwargs["size"] = {"shortest_edge": self.image_min_pixels, "longest_edge": self.image_max_pixels}
        batch = self.processor(text=texts, return_tensors="pt", padding=True, **kwargs)
        return {k: v.to(self.device) for k, v in batch.items()}


def load_mllm(name_or_path: str, dtype: str = "float32", device: str = "cpu",
              image_min_pixels: int = 3136, image_max_pixels: int = 200704) -> MLLM:
    # Left padding: the last position of every row is its real last token, which
    # both the fused embedding (last hidden state) and batched `generate` rely on.
    processor = load_processor(name_or_path)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=torch_dtype(dtype))
    model.to(device).eval()
    return MLLM(model, processor, name_or_path, torch.device(device), image_min_pixels, image_max_pixels)


def load_mllm_from_conf(m: dict) -> MLLM:
    """`load_mllm` from a `models.<role>` section of conf (a plain dict)."""
    return load_mllm(m["name_or_path"], dtype=m["dtype"], device=m["device"],
                     image_min_pixels=m["image_min_pixels"], image_max_pixels=m["image_max_pixels"])


def _user_turn(image: Image.Image | None, text: str | None) -> dict:
    content = []
    if image is not None:
        content.append({"type": "image"})
    if text:
        content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


class Captioner:
    """Image -> caption with the MLLM's `generate` (greedy, so reruns agree).

    The paper's mixed-length strategy (section 6.1) needs a long detailed caption for
    most pairs and a short one for the rest; each is one prompt and one length limit.
    """

    def __init__(self, mllm: MLLM):
        self.mllm = mllm

    @torch.inference_mode()
    def generate(self, images: Sequence[Image.Image | None], prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        conversations = [[_user_turn(im, p)] for im, p in zip(images, prompts)]
        present = [im for im in images if im is not None]
        batch = self.mllm.encode(conversations, present, add_generation_prompt=True)
        tok = self.mllm.tokenizer
        out = self.mllm.model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        )
        new_tokens = out[:, batch["input_ids"].shape[1]:]
        return [t.strip() for t in tok.batch_decode(new_tokens, skip_special_tokens=True)]

    def caption(self, images: Sequence[Image.Image], prompt: str, max_new_tokens: int) -> list[str]:
        return self.generate(images, [prompt] * len(images), max_new_tokens)


class FusedEmbedder:
    """f_M: an image, a text, or both -> a unit vector in the joint vision-language space.

    The input is an instruction-augmented chat sequence (a system turn carrying the
    instruction, a user turn carrying the image and/or text), as GME builds it; the
    embedding is the final hidden state of the last token, L2-normalised
    (fusion-diff section 3.1).
    """

    def __init__(self, mllm: MLLM, instruction: str, end_token: str):
        self.mllm = mllm
        self.instruction = instruction
        # GME ends the sequence with an end-of-text token after the assistant header and
        # reads that position's state; the token is a config value.
        self.end_token = end_token

    @property
    def dim(self) -> int:
        cfg = self.mllm.model.config
        return getattr(cfg, "text_config", cfg).hidden_size

    @torch.inference_mode()
    def embed(self, images: Sequence[Image.Image | None] | None = None, texts: Sequence[str | None] | None = None) -> torch.Tensor:
        n = len(images) if images is not None else len(texts)
        images = list(images) if images is not None else [None] * n
        texts = list(texts) if texts is not None else [None] * n
        if len(images) != len(texts):
            raise ValueError(f"embed got {len(images)} images and {len(texts)} texts: one of each per item")
        for im, t in zip(images, texts):
            if im is None and not t:
                raise ValueError("embed: every item needs an image, a text or both")
        conversations = [
            [{"role": "system", "content": [{"type": "text", "text": self.instruction}]}, _user_turn(im, t)]
            for im, t in zip(images, texts)
        ]
        present = [im for im in images if im is not None]
        batch = self.mllm.encode(conversations, present, add_generation_prompt=True, suffix=self.end_token)
        out = self.mllm.model(**batch, output_hidden_states=True, use_cache=False)
        last = out.hidden_states[-1][:, -1, :].float()
        return F.normalize(last, dim=-1)
