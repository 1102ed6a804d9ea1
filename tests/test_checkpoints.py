"""The models the production config names, in their real repositories' layouts
(tests/checkpoints.py says where each file's contents came from), load through the
production code path, and GME's vectors are GME's own.

GME equivalence: `gme_reference` below re-implements, line by line, the published
`GmeQwen2VL.embed`/`forward` of gme_inference.py (the message string, fetch_image's
resize, the processor call with truncation, the text decoder called with inputs_embeds
and no position ids, last-token pooling, L2 norm) on transformers' classes directly;
the project's FusedEmbedder, configured by conf/base.yaml's defaults, must give the
same input ids and the same vectors to 1e-5.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from model.mllm import Captioner, FusedEmbedder, load_mllm_from_conf, load_processor
from model.text_encoder import load_text_encoder_from_conf
from pipelines.config import load_config, plain
from tests import checkpoints as ck

pytestmark = pytest.mark.fast


@pytest.fixture(scope="module")
def gme(tmp_path_factory):
    return ck.gme_qwen2_vl_2b(str(tmp_path_factory.mktemp("gme") / "gme-Qwen2-VL-2B-Instruct"))


@pytest.fixture(scope="module")
def qwen25(tmp_path_factory):
    return ck.qwen2_5_vl_instruct(str(tmp_path_factory.mktemp("q") / "Qwen2.5-VL-7B-Instruct"))


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    return ck.t5_v1_1(str(tmp_path_factory.mktemp("t5") / "t5-v1_1-xl"))


def model_conf(role: str, path: str, **extra) -> dict:
    """conf/base.yaml's `models.<role>` (the production defaults) on the CPU, at `path`."""
    cfg = load_config("conf/base.yaml", [])
    return {**plain(cfg.models[role]), "name_or_path": path, "dtype": "float32", "device": "cpu", **extra}


def pictures() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(96, 96), (150, 70), (40, 230)]
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def assert_same_weights(loaded: torch.nn.Module, reference: torch.nn.Module) -> None:
    want, got = reference.state_dict(), loaded.state_dict()
    assert set(want) <= set(got)
    differ = [k for k in want if not torch.equal(want[k], got[k])]
    assert not differ, f"{len(differ)} tensors differ after loading, e.g. {differ[:3]}"


@pytest.mark.parametrize("which", ["gme", "qwen25"])
def test_qwen_vl_checkpoints_load_without_torchvision(which, request):
    """preprocessor_config.json names Qwen2VLProcessor / Qwen2_5_VLProcessor, whose
    AutoProcessor path needs torchvision (not installed); legacy weight names
    (`model.layers.*`, `visual.*`), sharded files and the legacy config form load."""
    path, reference = request.getfixturevalue(which)
    with pytest.raises(ImportError):
        import torchvision  # noqa: F401  (the case this test is about: no torchvision)
    mllm = load_mllm_from_conf(model_conf("embedder", path))
    assert type(mllm.model).__name__ == type(reference).__name__
    assert_same_weights(mllm.model, reference)
    assert "Pil" in type(mllm.processor.image_processor).__name__
    template = mllm.processor.chat_template or mllm.tokenizer.chat_template
    assert template == ck.QWEN_VL_CHAT_TEMPLATE


def test_captioner_generates_from_the_qwen25_layout(qwen25):
    path, _ = qwen25
    captioner = Captioner(load_mllm_from_conf(model_conf("captioner", path)))
    out = captioner.generate_ids(pictures()[:2], ["Describe this image.", "What colour is it?"], 5, 5)
    assert out.shape == (2, 5)


def test_describer_layout_is_the_same_loader(tmp_path):
    """72B ships the 7B's files in more shards; the loader sees no difference."""
    path, reference = ck.qwen2_5_vl_instruct(str(tmp_path / "Qwen2.5-VL-72B-Instruct"), seed=1, shards=5)
    assert_same_weights(load_mllm_from_conf(model_conf("describer", path)).model, reference)


def test_t5_v1_1_loads_from_spiece_model_alone(t5):
    import os

    import sentencepiece as spm

    path, reference = t5
    assert not os.path.exists(os.path.join(path, "tokenizer.json"))
    encoder = load_text_encoder_from_conf(model_conf("text_encoder", path, max_tokens=16), {})
    assert_same_weights(encoder.model.encoder, reference.encoder)
    text = "make the car red"
    sp = spm.SentencePieceProcessor(model_file=os.path.join(path, "spiece.model"))
    want = sp.encode(text) + [sp.eos_id()]
    assert encoder.tokenizer(text)["input_ids"] == want
    hidden, mask = encoder.encode([text, "a dog"])
    assert hidden.shape == (2, len(want), 32) and mask[0].all() and not mask[1].all()


def gme_reference(path: str, images, texts, instruction: str | None, is_query: bool) -> tuple[dict, torch.Tensor]:
    """GME's published inference, re-implemented line by line (see the module's doc)."""
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
        smart_resize,
    )

    min_pixels, max_pixels, max_length = 256 * 28 * 28, 1280 * 28 * 28, 1800
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, min_pixels=min_pixels, max_pixels=max_pixels)
    base = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()

    input_texts, input_images = [], []
    for t, i in zip(texts, images):
        if not is_query or instruction is None:
            instruction = "You are a helpful assistant."
        input_str = ""
        if i is None:
            input_images = None
        else:
            input_str += "<|vision_start|><|image_pad|><|vision_end|>"
            w, h = i.size  # fetch_image: qwen_vl_utils' smart_resize, 4 to 16,384 tokens
            rh, rw = smart_resize(h, w, 28, 4 * 28 * 28, 16384 * 28 * 28)
            input_images.append(i.convert("RGB").resize((rw, rh)))
        if t is not None:
            input_str += t
        input_texts.append(
            f"<|im_start|>system\n{instruction}<|im_end|>\n<|im_start|>user\n{input_str}<|im_end|>\n"
            "<|im_start|>assistant\n<|endoftext|>"
        )
    # What GME's processor call does (Qwen2VLProcessor): each <|image_pad|> expanded to
    # the image's merged-token count, then the tokenizer with padding and truncation.
    inputs = {}
    if input_images:
        inputs = dict(image_processor(images=input_images, return_tensors="pt"))
        counts = iter((inputs["image_grid_thw"].prod(-1) // 4).tolist())
        input_texts = [
            "<|vision_start|>".join(
                [parts[0]] + [f"{'<|image_pad|>' * next(counts)}{p[len('<|image_pad|>'):]}" for p in parts[1:]]
            )
            for parts in (t.split("<|vision_start|>") for t in input_texts)
        ]
    inputs.update(tokenizer(input_texts, padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt"))
    with torch.no_grad():
        inputs_embeds = base.model.language_model.embed_tokens(inputs["input_ids"])
        if input_images:
            pixel_values = inputs["pixel_values"].type(base.model.visual.dtype)
            image_embeds = base.model.visual(pixel_values, grid_thw=inputs["image_grid_thw"]).pooler_output
            image_mask = inputs["input_ids"] == base.config.image_token_id
            inputs_embeds[image_mask] = image_embeds
        outputs = base.model.language_model(inputs_embeds=inputs_embeds, attention_mask=inputs["attention_mask"])
        embeddings = outputs.last_hidden_state[:, -1]  # left padding
    return dict(inputs), F.normalize(embeddings, p=2, dim=1)


@pytest.mark.parametrize("case", ["query_image_text", "candidate_image", "query_text"])
def test_fused_embedder_equals_gme_inference(gme, case):
    path, _ = gme
    conf = model_conf("embedder", path)
    embedder = FusedEmbedder.from_conf(conf)
    ims, texts = pictures(), ["make it blue", "the same scene at night", "zoom out"]
    is_query = case.startswith("query")
    images = None if case == "query_text" else ims
    text_in = None if case == "candidate_image" else texts
    ref_inputs, ref = gme_reference(
        path, images or [None] * 3, text_in or [None] * 3,
        conf["query_instruction"] if is_query else None, is_query,
    )
    side = "query" if is_query else "candidate"
    got = embedder.embed(images=images, texts=text_in, side=side)
    conversations_ids = embedder_inputs(embedder, images, text_in, side)
    assert torch.equal(conversations_ids["input_ids"], ref_inputs["input_ids"])
    if images:
        assert torch.equal(conversations_ids["image_grid_thw"], ref_inputs["image_grid_thw"])
        assert conversations_ids["image_grid_thw"][:, 1:].prod(-1).min() >= 4 * 256  # GME's minimum
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def embedder_inputs(embedder: FusedEmbedder, images, texts, side) -> dict:
    """The model inputs FusedEmbedder builds, captured at the model's door."""
    seen = {}
    base = embedder.mllm.model.base_model
    handle = base.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        embedder.embed(images=images, texts=texts, side=side)
    finally:
        handle.remove()
    n, length = seen["input_ids"].shape
    assert torch.equal(seen["position_ids"], torch.arange(length).expand(3, n, length))
    return seen


def test_mrope_positions_are_a_different_embedding(gme):
    """position_ids is a real choice: Qwen2-VL's 3-D positions move image inputs' vectors."""
    path, _ = gme
    ims = pictures()
    seq = FusedEmbedder.from_conf(model_conf("embedder", path)).embed(images=ims)
    mrope = FusedEmbedder.from_conf(model_conf("embedder", path, position_ids="mrope")).embed(images=ims)
    # Random toy weights barely use position; still far outside the 1e-5 GME agreement.
    assert (seq - mrope).abs().max() > 1e-4


def test_instructions_separate_query_and_candidate(gme):
    path, _ = gme
    e = FusedEmbedder.from_conf(model_conf("embedder", path))
    q, c = e.embed(texts=["a red car"], side="query"), e.embed(texts=["a red car"], side="candidate")
    assert not torch.allclose(q, c)
    with pytest.raises(ValueError, match="side"):
        e.embed(texts=["a red car"], side="gallery")


def test_processor_of_an_unknown_model_type_is_named(tmp_path):
    from model.errors import PipelineError

    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(PipelineError, match="bert"):
        load_processor(str(tmp_path))


def test_memory_estimate_counts_the_checkpoints_parameters(gme):
    from model.memory import parameter_count, weights_bytes

    path, reference = gme
    n = sum(p.numel() for p in reference.parameters())
    assert parameter_count(path) == n
    assert weights_bytes(path, "bfloat16") == 2 * n


def test_the_72b_describer_is_refused_on_one_gpu_before_loading(tmp_path):
    """~73B parameters, ~136 GiB in bfloat16: one 80 GiB GPU cannot hold it, two can."""
    from model.errors import PipelineError
    from model.memory import GIB, check_fits, weights_bytes

    path = ck.qwen2_5_vl_72b_config(str(tmp_path / "Qwen2.5-VL-72B-Instruct"))
    need = weights_bytes(path, "bfloat16")
    assert 72e9 < need / 2 < 74e9
    with pytest.raises(PipelineError, match=r"needs 13\d\.\d GiB .* at least 2 such GPUs"):
        check_fits("models.describer", need, 1, 80, "shard it")
    check_fits("models.describer", need, 2, 80, "shard it")
    assert need / GIB > 80
