"""Tiny models with random weights, built offline, for the demo and the tests.

No model hub is reachable here, so the demo builds models of the production classes
(a Qwen2.5-VL MLLM, a T5 encoder) at toy sizes, with tokenizers trained on the spot,
saves them with `save_pretrained`, and every stage loads them back through the same
`from_pretrained` code that loads real checkpoints. Sizes come from conf (`tiny_models`).
"""
from __future__ import annotations

import os
from typing import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    T5Config,
    T5EncoderModel,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from model.mllm import _image_only_processor_class

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]

# Qwen's chat format, reduced to what the pipeline sends: text and image parts.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _train_bpe(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(corpus), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        padding_side="left", chat_template=QWEN_CHAT_TEMPLATE,
    )


def tiny_processor(corpus: Iterable[str], vocab_size: int, image_min_pixels: int,
                   image_max_pixels: int) -> tuple[ProcessorMixin, dict[str, int]]:
    """A Qwen-VL processor (BPE tokenizer trained on `corpus`, Qwen's image processor)
    and the ids of Qwen's special tokens in it."""
    tokenizer = _train_bpe(corpus, vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    image_processor = Qwen2VLImageProcessorPil(min_pixels=image_min_pixels, max_pixels=image_max_pixels)
    processor = _image_only_processor_class(Qwen2_5_VLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_CHAT_TEMPLATE,
    )
    return processor, ids


def build_tiny_mllm(out_dir: str, spec: dict, corpus: Iterable[str], seed: int) -> str:
    """A Qwen2.5-VL-family MLLM at toy size, saved to `out_dir`; returns `out_dir`."""
    processor, ids = tiny_processor(
        corpus, spec["vocab_size"], spec["image_min_pixels"], spec["image_max_pixels"]
    )
    tokenizer = processor.tokenizer
    head_dim = spec["hidden_size"] // spec["num_attention_heads"]
    # Qwen's multimodal rope splits head_dim/2 frequencies over (time, height, width).
    half = head_dim // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=spec["hidden_size"],
            intermediate_size=spec["intermediate_size"],
            num_hidden_layers=spec["num_layers"],
            num_attention_heads=spec["num_attention_heads"],
            num_key_value_heads=spec["num_key_value_heads"],
            rope_parameters={
                "rope_type": "default", "rope_theta": spec["rope_theta"], "mrope_section": mrope},
            max_position_embeddings=spec["max_position_embeddings"],
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=spec["vision_depth"],
            hidden_size=spec["vision_hidden_size"],
            intermediate_size=2 * spec["vision_hidden_size"],
            num_heads=spec["vision_num_heads"],
            out_hidden_size=spec["hidden_size"],
            fullatt_block_indexes=[spec["vision_depth"] - 1],
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def build_tiny_t5_encoder(out_dir: str, spec: dict, corpus: Iterable[str], seed: int) -> str:
    """A T5 encoder at toy size with a Unigram tokenizer trained on `corpus`."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=spec["vocab_size"],
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
    )
    tok.train_from_iterator(list(corpus), trainer)
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=spec["d_model"],
        d_ff=2 * spec["d_model"],
        d_kv=spec["d_model"] // spec["num_heads"],
        num_layers=spec["num_layers"],
        num_heads=spec["num_heads"],
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = T5EncoderModel(config)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
