"""The model wrappers on the tiny offline models: f_M, the captioner, the text encoder."""
import pytest
import torch

from model.mllm import Captioner, FusedEmbedder, load_mllm
from model.text_encoder import TextEncoder
from pipelines.synthetic import Item, draw
import random

pytestmark = pytest.mark.fast

INSTRUCTION = "Represent the user's input."


@pytest.fixture(scope="module")
def mllm(tiny_models):
    return load_mllm(tiny_models["mllm"], image_min_pixels=3136, image_max_pixels=12544)


@pytest.fixture(scope="module")
def embedder(mllm):
    return FusedEmbedder(mllm, INSTRUCTION, INSTRUCTION, "<|endoftext|>")


def images():
    rng = random.Random(0)
    return [draw(Item("circle", "red", "small", "left", "white"), 96, rng),
            draw(Item("square", "blue", "large", "right", "black"), 64, rng).resize((160, 64)),
            draw(Item("diamond", "green", "small", "centre", "grey"), 120, rng)]


def test_embeddings_have_model_size_and_unit_norm(embedder):
    v = embedder.embed(images=images(), texts=["a red circle", None, "make it a green diamond please"])
    assert v.shape == (3, embedder.dim) and v.dtype == torch.float32
    assert torch.allclose(v.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_same_input_same_vector_and_inputs_differ(embedder):
    ims = images()
    a = embedder.embed(images=ims[:1], texts=["a red circle"])
    b = embedder.embed(images=ims[:1], texts=["a red circle"])
    assert torch.equal(a, b)
    img_only = embedder.embed(images=ims[:1])
    txt_only = embedder.embed(texts=["a red circle"])
    assert (a - img_only).abs().max() > 1e-3 and (a - txt_only).abs().max() > 1e-3


def test_item_alone_equals_item_in_a_padded_batch(embedder):
    """Left padding and the attention mask: other items' lengths must not leak in."""
    ims = images()
    texts = ["x", "a much longer text about a large blue square on the right side of the image", None]
    batch = embedder.embed(images=ims, texts=texts)
    for i in range(3):
        alone = embedder.embed(images=[ims[i]], texts=[texts[i]])
        assert torch.allclose(alone[0], batch[i], atol=1e-5), i
    t_batch = embedder.embed(texts=["short", "a rather longer description of an image with many tokens"])
    t_alone = embedder.embed(texts=["short"])
    assert torch.allclose(t_alone[0], t_batch[0], atol=1e-5)


def test_embed_refuses_empty_items(embedder):
    with pytest.raises(ValueError, match="image, a text or both"):
        embedder.embed(images=[None], texts=[""])


def test_captioner_is_greedy_and_batch_independent(mllm):
    cap = Captioner(mllm)
    ims = images()
    out = cap.caption(ims, "Describe this image.", max_new_tokens=6)
    assert len(out) == 3 and all(isinstance(c, str) for c in out)
    assert cap.caption(ims[1:2], "Describe this image.", max_new_tokens=6) == out[1:2]


@pytest.mark.parametrize("kind", ["t5", "mllm"])
def test_text_encoder_tokens_mask_and_padding(kind, tiny_models, mllm):
    enc = TextEncoder(kind, tiny_models["t5"] if kind == "t5" else None, max_tokens=16, mllm=mllm)
    texts = ["a red circle", "change the colour to blue and move it to the left of the image"]
    c, mask = enc.encode(texts)
    assert c.shape[:2] == mask.shape and c.shape[0] == 2 and c.shape[2] == enc.dim
    assert c.shape[1] <= 16
    assert mask[1].all() and not mask[0].all()  # the short text is padded
    assert torch.all(c[0][~mask[0]] == 0)
    alone, mask_alone = enc.encode(texts[:1])
    n = int(mask_alone.sum())
    assert torch.allclose(alone[0, :n], c[0, :n], atol=1e-5)


@pytest.mark.parametrize("kind", ["t5", "mllm"])
def test_kept_texts_give_the_encoders_tokens_and_are_not_encoded_again(kind, tiny_models, mllm):
    """train.condition_cache_texts: a text met before is not encoded again, the batch
    padded from kept tokens equals the encoder's own, and the oldest go past the limit."""
    path = tiny_models["t5"] if kind == "t5" else None
    plain_enc = TextEncoder(kind, path, max_tokens=16, mllm=mllm)
    kept = TextEncoder(kind, path, max_tokens=16, mllm=mllm, kept_texts=3)
    encoded = []
    encode = kept._encode
    kept._encode = lambda texts: encoded.append(list(texts)) or encode(texts)
    texts = ["a red circle", "change the colour to blue and move it to the left of the image",
             "a small green diamond", "a white background"]

    def both(batch: list[str]):
        a, ma = plain_enc.encode(batch)
        b, mb = kept.encode(batch)
        assert a.shape == b.shape and torch.equal(ma, mb)
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()

    both(texts[:2] + texts[:1])
    assert encoded == [texts[:2]]  # a repeated text once
    both([texts[1], texts[0]])
    assert len(encoded) == 1  # both kept: nothing encoded, another order
    both(texts[2:])
    assert encoded[1:] == [texts[2:]] and len(kept._kept) == 3  # the oldest unused went
    both(texts[:2])
    assert encoded[2:] == [texts[1:2]]  # the first text was used last, the second went
