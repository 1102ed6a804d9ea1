"""Toy-size checkpoints in the real repositories' layouts.

The demo's tiny models are saved by today's transformers in today's form; the real
checkpoints the production config names were saved by older versions in older forms,
and those forms are what a real run meets. Each builder here writes a folder whose
files are, in kind, name and field names, those of a real repository, at toy sizes:

- GME-Qwen2-VL-2B-Instruct (Alibaba-NLP/gme-Qwen2-VL-2B-Instruct): a Qwen2-VL config in
  the flat legacy form (text fields at the top level, `rope_scaling` {"type": "mrope"},
  vision_config with `embed_dim`/`mlp_ratio`), `preprocessor_config.json` naming
  `Qwen2VLProcessor`, the tokenizer as vocab.json + merges.txt + tokenizer.json +
  tokenizer_config.json (chat template inside it), and weights under the legacy key
  names (`model.layers.*`, `visual.*`; tied embeddings, so no `lm_head`).
- Qwen2.5-VL-{7B,72B}-Instruct: the same for qwen2_5_vl (vision_config with
  `fullatt_block_indexes`, `window_size`), `preprocessor_config.json` naming
  `Qwen2_5_VLProcessor`, the chat template in chat_template.json, and sharded weights
  with model.safetensors.index.json (72B ships 38 shards).
- google/t5-v1_1-xl: a T5ForConditionalGeneration config (gated-gelu, untied
  embeddings), `spiece.model` alone as the tokenizer (no tokenizer.json; 100 extra ids
  added by the tokenizer), weights in pytorch_model.bin (encoder, decoder and lm_head).

Where the contents came from: the preprocessor fields and the processor class are the
published `preprocessor_config.json` of Qwen/Qwen2.5-VL-7B-Instruct (quoted in public
model notes); the chat template is the official Qwen2-VL/Qwen2.5-VL one (the same text
in several public copies of chat_template.json); config
field names are those of the published config.json files of the three repositories;
GME's instruction strings and its inference arithmetic are from its published
`gme_inference.py` (copies in TIGER-AI-Lab/VLM2Vec and embeddings-benchmark/mteb).
Sizes, vocabularies and token ids are toy ones (a tokenizer trained on the spot).
"""
from __future__ import annotations

import io
import json
import os

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# The official Qwen2-VL / Qwen2.5-VL chat template (the `chat_template` of their
# chat_template.json / tokenizer_config.json, identical in several public copies).
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen/Qwen2.5-VL-7B-Instruct's preprocessor_config.json (GME's is the same with
# Qwen2VLProcessor as its processor_class).
QWEN_PREPROCESSOR = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
}

# GME's two instructions (gme_inference.py: the candidate side's default, and the task
# instruction MTEB gives GME's query side for CIRR).
GME_CANDIDATE_INSTRUCTION = "You are a helpful assistant."
GME_CIRR_QUERY_INSTRUCTION = (
    "Retrieve a day-to-day image that aligns with the modification instructions of the provided image."
)


def _write_json(path: str, data) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def _qwen_tokenizer(out: str, corpus: list[str], vocab_size: int, template_in_config: bool) -> dict:
    """vocab.json, merges.txt, tokenizer.json and tokenizer_config.json as Qwen ships
    them; returns the special tokens' ids."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(QWEN_SPECIALS)
    tok.save(os.path.join(out, "tokenizer.json"))
    tok.model.save(out)  # vocab.json and merges.txt, as the repositories also ship them
    ids = {t: tok.token_to_id(t) for t in QWEN_SPECIALS}
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False, "special": True}
            for t in QWEN_SPECIALS
        },
        "additional_special_tokens": QWEN_SPECIALS[1:],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "padding_side": "left" if template_in_config else "right",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if template_in_config:
        config["chat_template"] = QWEN_VL_CHAT_TEMPLATE
    else:
        _write_json(os.path.join(out, "chat_template.json"), {"chat_template": QWEN_VL_CHAT_TEMPLATE})
    _write_json(os.path.join(out, "tokenizer_config.json"), config)
    _write_json(os.path.join(out, "special_tokens_map.json"), {
        "additional_special_tokens": QWEN_SPECIALS[1:], "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
    })
    return ids


def _text_fields(ids: dict, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int,
                 mrope: list[int], tied: bool, max_pos: int) -> dict:
    """The top-level text fields of a legacy Qwen-VL config.json."""
    return {
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": 2 * hidden,
        "max_position_embeddings": max_pos,
        "max_window_layers": layers,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": max_pos,
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
        "transformers_version": "4.45.0.dev0",
        "use_cache": True,
        "use_sliding_window": False,
        "rope_scaling": {"type": "mrope", "mrope_section": mrope},
        "vocab_size": vocab,
    }


def _legacy_weights(model) -> dict[str, torch.Tensor]:
    """The model's weights under the key names the checkpoints were published with
    (before transformers split the language model out: `model.layers.*`, `visual.*`)."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model."):]
        elif key.startswith("model.visual."):
            key = "visual." + key[len("model.visual."):]
        if key == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False):
            continue
        out[key] = value.detach().clone().contiguous()
    return out


def _save_sharded(weights: dict[str, torch.Tensor], out: str, shards: int) -> None:
    """model.safetensors, or `shards` files and model.safetensors.index.json."""
    if shards == 1:
        save_file(weights, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
        return
    keys = sorted(weights)
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in weights.values())},
             "weight_map": {}}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: weights[k] for k in part}, os.path.join(out, name), metadata={"format": "pt"})
        index["weight_map"].update({k: name for k in part})
    _write_json(os.path.join(out, "model.safetensors.index.json"), index)


def _corpus() -> list[str]:
    from pipelines.synthetic import tokenizer_corpus

    return tokenizer_corpus() + [GME_CANDIDATE_INSTRUCTION, GME_CIRR_QUERY_INSTRUCTION]


def gme_qwen2_vl_2b(out: str, seed: int = 0) -> tuple[str, torch.nn.Module]:
    """GME-Qwen2-VL-2B-Instruct's layout at toy size; returns the folder and the model
    whose weights it holds (the reference the loaded model must equal)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    os.makedirs(out, exist_ok=True)
    ids = _qwen_tokenizer(out, _corpus(), 500, template_in_config=True)
    vocab = max(ids.values()) + 1
    config = {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        **_text_fields(ids, vocab, 48, 2, 4, 2, mrope=[2, 2, 2], tied=True, max_pos=32768),
        "vision_config": {
            "depth": 2, "embed_dim": 32, "mlp_ratio": 4, "num_heads": 4, "in_chans": 3,
            "hidden_size": 48, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
            "temporal_patch_size": 2,
        },
    }
    _write_json(os.path.join(out, "config.json"), config)
    _write_json(os.path.join(out, "generation_config.json"), {
        "bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "do_sample": True,
        "temperature": 0.01, "top_k": 1, "top_p": 0.001, "transformers_version": "4.45.0.dev0",
    })
    _write_json(os.path.join(out, "preprocessor_config.json"),
                {**QWEN_PREPROCESSOR, "processor_class": "Qwen2VLProcessor"})
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_pretrained(out)).eval()
    _save_sharded(_legacy_weights(model), out, shards=2)
    return out, model


def qwen2_5_vl_instruct(out: str, seed: int = 0, shards: int = 2) -> tuple[str, torch.nn.Module]:
    """Qwen2.5-VL-{7B,72B}-Instruct's layout at toy size (the two differ in sizes and
    shard count only)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    os.makedirs(out, exist_ok=True)
    ids = _qwen_tokenizer(out, _corpus(), 500, template_in_config=False)
    vocab = max(ids.values()) + 1
    config = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        **_text_fields(ids, vocab, 48, 2, 4, 2, mrope=[2, 2, 2], tied=False, max_pos=128000),
        "vision_config": {
            "depth": 2, "hidden_act": "silu", "hidden_size": 32, "intermediate_size": 64,
            "num_heads": 4, "in_chans": 3, "out_hidden_size": 48, "patch_size": 14,
            "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
            "fullatt_block_indexes": [1], "tokens_per_second": 2, "temporal_patch_size": 2,
        },
    }
    _write_json(os.path.join(out, "config.json"), config)
    _write_json(os.path.join(out, "generation_config.json"), {
        "bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"],
        "do_sample": True, "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "repetition_penalty": 1.05, "temperature": 1e-06, "transformers_version": "4.49.0",
    })
    _write_json(os.path.join(out, "preprocessor_config.json"),
                {**QWEN_PREPROCESSOR, "processor_class": "Qwen2_5_VLProcessor"})
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_pretrained(out)).eval()
    _save_sharded(_legacy_weights(model), out, shards=shards)
    return out, model


def t5_v1_1(out: str, seed: int = 0) -> tuple[str, torch.nn.Module]:
    """google/t5-v1_1-xl's layout at toy size: config.json, spiece.model,
    special_tokens_map.json and pytorch_model.bin."""
    import sentencepiece as spm
    from transformers import T5Config, T5ForConditionalGeneration

    os.makedirs(out, exist_ok=True)
    model_file = io.BytesIO()
    # T5's SentencePiece ids: pad 0, eos 1, unk 2, no bos.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=model_file, vocab_size=80,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        minloglevel=2,
    )
    with open(os.path.join(out, "spiece.model"), "wb") as f:
        f.write(model_file.getvalue())
    extra = [f"<extra_id_{i}>" for i in range(100)]
    _write_json(os.path.join(out, "special_tokens_map.json"), {
        "additional_special_tokens": extra, "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
    })
    config = {
        "architectures": ["T5ForConditionalGeneration"],
        "d_ff": 96, "d_kv": 8, "d_model": 32, "decoder_start_token_id": 0, "dropout_rate": 0.1,
        "eos_token_id": 1, "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0,
        "is_encoder_decoder": True, "layer_norm_epsilon": 1e-06, "model_type": "t5",
        "num_decoder_layers": 2, "num_heads": 4, "num_layers": 2, "output_past": True,
        "pad_token_id": 0, "relative_attention_num_buckets": 32, "tie_word_embeddings": False,
        "vocab_size": 80 + len(extra),
    }
    _write_json(os.path.join(out, "config.json"), config)
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(T5Config.from_pretrained(out)).eval()
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, "pytorch_model.bin"))
    return out, model


def qwen2_5_vl_72b_config(out: str) -> str:
    """Qwen2.5-VL-72B-Instruct's config.json at its real size (config only, no weights:
    for memory estimates, which count parameters on the meta device)."""
    ids = {t: 151643 + i for i, t in enumerate(QWEN_SPECIALS)}
    os.makedirs(out, exist_ok=True)
    config = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        **_text_fields(ids, 152064, 8192, 80, 64, 8, mrope=[16, 24, 24], tied=False, max_pos=128000),
        "intermediate_size": 29568,
        "torch_dtype": "bfloat16",
        "vision_config": {
            "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3456,
            "num_heads": 16, "in_chans": 3, "out_hidden_size": 8192, "patch_size": 14,
            "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2,
        },
    }
    _write_json(os.path.join(out, "config.json"), config)
    return out
