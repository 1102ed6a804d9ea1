"""Per-batch ops without Ray: image checks, ingest, caption and embed on the tiny models."""
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from ops.caption import CaptionOp
from ops.base import vectors_to_arrow
from ops.embed import EmbeddingSizeError, EmbedOp, uses_short_caption
from ops.images import ImageLimits, ImageRejected, probe_image
from ops.ingest import IngestOp
from pipelines.config import load_config, plain
from pipelines.synthetic import make_catalogue
from tests.badfiles import write_bad_files

pytestmark = pytest.mark.fast

LIMITS = {"min_side": 16, "max_side": 12000, "max_pixels": 100_000_000}


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    root = tmp_path_factory.mktemp("cat")
    uris = make_catalogue(str(root), num_images=6, image_size=64, num_triplets=2, num_queries=2, seed=1)
    bad = write_bad_files(root / "bad")
    return {"manifest": pa.parquet.read_table(uris["manifest"]), "bad": bad}


@pytest.mark.parametrize("name, reason", [
    ("notes.txt", "not an image"), ("truncated.jpg", "corrupt"), ("pixel.png", "too small"),
    ("huge.png", "too large"), ("empty.png", "empty"),
])
def test_probe_rejects_bad_images_with_a_reason(catalogue, name, reason):
    with open(catalogue["bad"][name], "rb") as f:
        data = f.read()
    with pytest.raises(ImageRejected, match=reason):
        probe_image(data, ImageLimits.from_conf(LIMITS))


def test_ingest_op_hashes_good_rows_and_rejects_bad_ones(catalogue):
    m = catalogue["manifest"]
    good = m.slice(0, 2).to_pydict()
    bad = catalogue["bad"]
    batch = {
        "image_id": good["image_id"] + ["b1", "b2", "", "dup", "b3"],
        "uri": good["uri"] + [bad["notes.txt"], "/nonexistent/x.png", good["uri"][0], good["uri"][1], bad["huge.png"]],
        "caption": good["caption"] + [None] * 5,
    }
    out = IngestOp({"images": LIMITS}, None, duplicate_ids=frozenset({"dup"}))(pa.table(batch)).to_pylist()
    assert [r["reject_reason"] for r in out[:2]] == [None, None]
    assert all(len(r["sha256"]) == 64 and r["width"] == 64 for r in out[:2])
    assert out[0]["source_caption"] == good["caption"][0]
    reasons = [r["reject_reason"] for r in out[2:]]
    assert "not an image" in reasons[0] and "missing file" in reasons[1]
    assert reasons[2] == "empty image_id" and "duplicate" in reasons[3] and "too large" in reasons[4]


def test_caption_op_uses_manifest_caption_as_short_caption(catalogue, tiny_models):
    cfg = load_config("conf/demo.yaml", [f"models.captioner.name_or_path={tiny_models['mllm']}"])
    op = CaptionOp(plain(cfg), None)
    ingested = IngestOp({"images": LIMITS}, None)(catalogue["manifest"].slice(0, 3)).to_pydict()
    ingested["source_caption"][1] = None
    ingested["uri"][2] = "/nonexistent.png"
    out = op(pa.table(ingested)).to_pylist()
    out = sorted(out, key=lambda r: r["image_id"])
    assert out[0]["caption_short"] == ingested["source_caption"][0] and out[0]["caption_short_source"] == "manifest"
    assert out[1]["caption_short_source"] == "model" and isinstance(out[1]["caption_long"], str)
    assert out[2]["reject_reason"].startswith("cannot read") and out[2]["caption_long"] is None


def test_embed_op_writes_two_unit_vectors_per_image_and_rejects(catalogue, tiny_models):
    cfg = load_config("conf/demo.yaml", [f"models.embedder.name_or_path={tiny_models['mllm']}"])
    op = EmbedOp(plain(cfg), None)
    ingested = IngestOp({"images": LIMITS}, None)(catalogue["manifest"].slice(0, 3)).to_pydict()
    ingested["sha256"][2] = "0" * 64  # the file changed since ingest
    batch = {**ingested, "pair_text": ["a red thing", "a blue thing", "x"], "pair_caption_kind": ["long", "short", "long"]}
    out = op(pa.table(batch))
    assert out.schema.field("vector").type == pa.list_(pa.float32(), cfg.models.embedder.dim)
    rows = out.to_pylist()
    good = [r for r in rows if r["reject_reason"] is None]
    assert sorted((r["image_id"], r["kind"]) for r in good) == sorted(
        (i, k) for i in ingested["image_id"][:2] for k in ("image", "pair"))
    assert all(abs(np.linalg.norm(r["vector"]) - 1) < 1e-5 for r in good)
    assert [r["caption_kind"] for r in good if r["kind"] == "pair"] == ["long", "short"]
    (rej,) = [r for r in rows if r["reject_reason"]]
    assert "changed since ingest" in rej["reject_reason"] and rej["vector"] is None


def test_embed_op_puts_each_image_through_the_vision_tower_once(catalogue, tiny_models, monkeypatch):
    """f_M(I) and f_M(I, T) of a batch come from one call that runs each image's vision
    tower once; the vectors are those of two calls without the sharing, in one part or
    in the overlapped parts of models.embedder.overlap_parts."""
    cfg = load_config("conf/demo.yaml", [f"models.embedder.name_or_path={tiny_models['mllm']}"])
    op = EmbedOp(plain(cfg), None)
    ingested = IngestOp({"images": LIMITS}, None)(catalogue["manifest"].slice(0, 3)).to_pydict()
    texts = ["a red thing", "a blue thing on a white ground", "x"]
    batch = {**ingested, "pair_text": texts, "pair_caption_kind": ["long"] * 3}
    base = op.embedder.mllm.model.base_model
    towers = []
    monkeypatch.setattr(base, "get_image_features",
                        lambda pixels, grid, _f=base.get_image_features, **k: towers.append(len(grid))
                        or _f(pixels, grid, **k))
    rows = op(pa.table(batch)).to_pylist()
    assert towers == [3]
    images = [Image.open(u).convert("RGB") for u in ingested["uri"]]
    alone, paired = op.embedder.embed(images=images), op.embedder.embed(images=images, texts=texts)
    assert towers[1:] == [3, 3]
    got = {(r["image_id"], r["kind"]): r["vector"] for r in rows}
    for i, image_id in enumerate(ingested["image_id"]):
        np.testing.assert_allclose(got[image_id, "image"], alone[i].numpy(), atol=1e-5)
        np.testing.assert_allclose(got[image_id, "pair"], paired[i].numpy(), atol=1e-5)
    op.embedder.overlap_parts = 2
    keys = [0, 1, 2, 0, 1, 2]
    parts = op.embedder.embed(images=images + images, texts=[None] * 3 + texts, image_keys=keys)
    np.testing.assert_allclose(parts.numpy(), np.concatenate([alone, paired]), atol=1e-5)


def test_embed_op_refuses_a_wrong_dimension(tiny_models):
    cfg = load_config("conf/demo.yaml", [f"models.embedder.name_or_path={tiny_models['mllm']}", "models.embedder.dim=1536"])
    with pytest.raises(EmbeddingSizeError, match="size 64.*dim is 1536"):
        EmbedOp(plain(cfg), None)
    with pytest.raises(EmbeddingSizeError, match="size 8"):
        vectors_to_arrow(np.zeros((2, 4)), 8)


def test_mixed_length_draw_is_stable_and_near_its_fraction():
    ids = [f"img{i}" for i in range(4000)]
    share = np.mean([uses_short_caption(i, 0.15) for i in ids])
    assert 0.13 < share < 0.17
    assert [uses_short_caption(i, 0.15) for i in ids[:50]] == [uses_short_caption(i, 0.15) for i in ids[:50]]
    assert not any(uses_short_caption(i, 0.0) for i in ids) and all(uses_short_caption(i, 1.0) for i in ids)
