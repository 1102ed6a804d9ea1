"""The packed vision attention (model/vision_attention.py) against transformers' own
per-image path: the towers of both Qwen-VL families at toy size, and the whole fused
embedding through the production loader."""

import pytest
import torch
from PIL import Image
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

import model.vision_attention as va
from model.mllm import FusedEmbedder, load_mllm
from model.vision_attention import LinearPatchEmbed, PackedVisionAttention, linear_patch_embed, set_vision_attention

pytestmark = pytest.mark.fast

PATCH = 14

INSTRUCTION = "Represent the user's input."


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def qwen2_vl_tower():
    # GME-Qwen2-VL's tower (Qwen2VLVisionConfig field names), shrunk.
    config = Qwen2VLVisionConfig(depth=3, embed_dim=32, num_heads=4, mlp_ratio=2, hidden_size=48,
                                 patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2)
    return config, Qwen2VisionTransformerPretrainedModel


def qwen2_5_vl_tower():
    # Qwen2.5-VL's tower: window attention (112-pixel windows = 8x8 patches) except in
    # the blocks of fullatt_block_indexes, so both kinds of segments are exercised.
    config = Qwen2_5_VLVisionConfig(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=48,
                                    patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2,
                                    window_size=112, fullatt_block_indexes=[1])
    return config, Qwen2_5_VisionTransformerPretrainedModel


def tower(make, mode: str):
    config, cls = make()
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = cls(config).eval()
    return set_vision_attention(model, mode)


def patches(grids: list[tuple[int, int]], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    thw = torch.tensor([[1, h, w] for h, w in grids])
    tokens = int(sum(h * w for h, w in grids))
    return torch.randn(tokens, 3 * 2 * PATCH * PATCH, generator=g), thw


# Images of three sizes (one not a multiple of the 8-patch window), then three of one size.
MIXED = [(16, 12), (8, 8), (10, 22)]
UNIFORM = [(12, 12)] * 3


@pytest.mark.parametrize("make", [qwen2_vl_tower, qwen2_5_vl_tower], ids=["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("mode", ["padded", "flex"])
@pytest.mark.parametrize("grids", [MIXED, UNIFORM], ids=["mixed", "uniform"])
def test_packed_tower_equals_the_per_image_tower(make, mode, grids):
    x, thw = patches(grids)
    with torch.inference_mode():
        want = tower(make, "per_image")(x, grid_thw=thw).pooler_output
        got = tower(make, mode)(x, grid_thw=thw).pooler_output
    assert got.shape == want.shape
    assert rel(got, want) < 1e-5


@pytest.mark.parametrize("make", [qwen2_vl_tower, qwen2_5_vl_tower], ids=["qwen2_vl", "qwen2_5_vl"])
def test_the_patch_embedding_as_a_matrix_product_is_the_convolution(make):
    """LinearPatchEmbed (what load_mllm puts in every tower) against transformers' Conv3d:
    the same patch embeddings, the same gradients and the same state-dict keys."""
    model = tower(make, "per_image")
    keys = sorted(model.state_dict())
    x, thw = patches(MIXED)
    conv = model.patch_embed
    want = conv(x)
    want.square().sum().backward()
    want_grad = conv.proj.weight.grad.clone()
    conv.proj.weight.grad = None
    linear_patch_embed(model)
    assert isinstance(model.patch_embed, LinearPatchEmbed) and model.patch_embed.proj is conv.proj
    assert sorted(model.state_dict()) == keys
    got = model.patch_embed(x)
    got.square().sum().backward()
    assert got.shape == want.shape == (x.shape[0], conv.embed_dim)
    assert rel(got, want) < 1e-5 and rel(conv.proj.weight.grad, want_grad) < 1e-5
    # Applied twice, it stays one layer deep.
    linear_patch_embed(model)
    assert model.patch_embed.proj is conv.proj and model.patch_embed.original[0] is conv


def test_layout_is_worked_out_once_per_forward_not_per_layer(monkeypatch):
    calls = []
    original = va.SegmentLayout.from_cu_seqlens.__func__

    def counted(cls, cu_seqlens):
        calls.append(cu_seqlens.shape[0])
        return original(cls, cu_seqlens)

    monkeypatch.setattr(va.SegmentLayout, "from_cu_seqlens", classmethod(counted))
    x, thw = patches(MIXED)
    with torch.inference_mode():
        tower(qwen2_vl_tower, "padded")(x, grid_thw=thw)
    assert calls == [len(MIXED) + 1]  # 3 layers, one layout
    calls.clear()
    with torch.inference_mode():
        tower(qwen2_5_vl_tower, "padded")(x, grid_thw=thw)
    # Two layouts (windows, whole images) for 3 layers; more windows than images.
    assert len(calls) == 2 and max(calls) > len(MIXED) + 1


def test_switching_keeps_the_weights_and_goes_back():
    model = tower(qwen2_vl_tower, "per_image")
    keys = sorted(model.state_dict())
    set_vision_attention(model, "flex")
    assert all(isinstance(b.attn, PackedVisionAttention) for b in model.blocks)
    assert sorted(model.state_dict()) == keys
    set_vision_attention(model, "padded")
    assert {b.attn.mode for b in model.blocks} == {"padded"}
    set_vision_attention(model, "per_image")
    assert not any(isinstance(b.attn, PackedVisionAttention) for b in model.blocks)


def test_unknown_mode_and_a_model_without_a_tower_are_refused():
    with pytest.raises(ValueError, match="expected one of per_image, padded, flex"):
        set_vision_attention(tower(qwen2_vl_tower, "per_image"), "varlen")
    with pytest.raises(ValueError, match="Linear has no Qwen-VL vision tower"):
        set_vision_attention(torch.nn.Linear(2, 2), "padded")


def test_fused_embeddings_are_the_same_with_packed_attention(tiny_models):
    # Images of two aspect ratios: two numbers of image tokens in one batch.
    images = [Image.new("RGB", (64 + 24 * i, 64), (40 * i, 200, 90)) for i in range(3)]
    images.append(Image.new("RGB", (150, 60), (10, 10, 220)))
    texts = ["a red circle", None, "make it blue", "a small square on the left"]
    vectors = {}
    for mode in ("per_image", "padded", "flex"):
        mllm = load_mllm(tiny_models["mllm"], image_min_pixels=3136, image_max_pixels=12544, vision_attention=mode)
        embedder = FusedEmbedder(mllm, INSTRUCTION, INSTRUCTION, "<|endoftext|>")
        vectors[mode] = embedder.embed(images=images, texts=texts)
    lengths = {int(h * w) for h, w in mllm.encode(
        [[{"role": "user", "content": [{"type": "image"}]}]] * 4, images, True)["image_grid_thw"][:, 1:].tolist()}
    assert len(lengths) > 1
    for mode in ("padded", "flex"):
        assert rel(vectors[mode], vectors["per_image"]) < 1e-5, mode

