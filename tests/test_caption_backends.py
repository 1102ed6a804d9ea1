"""The caption stage's vLLM backend, up to the engine: vLLM itself is not installed on
these machines, so the requests, the processor's wiring and the gathering of results
are tested here, and running it is refused with a clear error."""
import base64
import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from ops.caption import CaptionRequestOp, captions_from_results, vllm_request, vllm_result
from ops.images import sha256_hex
from pipelines.config import ConfigError, load_config, plain


def _png(path, color) -> str:
    Image.new("RGB", (40, 30), color).save(path)
    return sha256_hex(path.read_bytes())


@pytest.fixture
def batch(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return pa.table({"image_id": ["a", "b", "bad"], "uri": [str(a), str(b), str(bad)],
                     "sha256": [_png(a, "red"), _png(b, "blue"), sha256_hex(bad.read_bytes())],
                     "source_caption": pa.array(["a red card", None, None], pa.string())})


@pytest.mark.fast
def test_requests_one_per_caption_to_write_and_rejects(batch):
    whole = plain(load_config("conf/demo.yaml"))
    rows = CaptionRequestOp(whole, None)(batch).to_pylist()
    conf = whole["caption"]
    kinds = [(r["image_id"], r["kind"]) for r in rows]
    # a: the manifest's caption is its short one; b: both generated; bad: one reject row.
    assert kinds == [("a", "long"), ("b", "long"), ("b", "short"), ("bad", "long")]
    assert rows[0]["max_tokens"] == conf["max_new_tokens_long"] and rows[2]["max_tokens"] == conf["max_new_tokens_short"]
    assert "corrupt" in rows[3]["reject_reason"] or "cannot" in rows[3]["reject_reason"].lower()
    assert rows[3]["image_url"] is None
    # The data URL carries the checked image losslessly.
    png = base64.b64decode(rows[1]["image_url"].split(",", 1)[1])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), np.asarray(Image.open(batch["uri"][1].as_py()).convert("RGB")))
    # Without the manifest's caption, every image gets a short one generated.
    no_manifest = CaptionRequestOp({**whole, "caption": {**conf, "short_from_manifest": False}}, None)(batch).to_pylist()
    assert [(r["image_id"], r["kind"]) for r in no_manifest][:3] == [("a", "long"), ("a", "short"), ("b", "long")]


@pytest.mark.fast
def test_results_gather_into_the_rows_the_transformers_backend_writes(batch):
    requests = CaptionRequestOp(plain(load_config("conf/demo.yaml")), None)(batch).to_pylist()
    engine_out = []
    for r in requests[:3]:
        req = vllm_request(r)
        assert req["sampling_params"] == {"temperature": 0.0, "max_tokens": r["max_tokens"]}
        assert req["messages"][0]["content"][0] == {"type": "image", "image": r["image_url"]}
        engine_out.append({**req, "generated_text": f" {r['kind']} text of {r['image_id']} "})
    results = [vllm_result(o) for o in engine_out]
    a = captions_from_results([x for x in results if x["image_id"] == "a"], "m")
    b = captions_from_results([x for x in results if x["image_id"] == "b"], "m")
    bad = captions_from_results([{**requests[3], "text": None}], "m")
    assert (a["caption_long"], a["caption_short"], a["caption_short_source"]) == ("long text of a", "a red card", "manifest")
    assert (b["caption_long"], b["caption_short"], b["caption_short_source"]) == ("long text of b", "short text of b", "model")
    assert bad["reject_reason"] and bad["caption_long"] is None and bad["model"] == "m"


def test_vllm_processor_is_wired_for_images(ray_local):
    from pipelines.caption import vllm_processor

    cfg = load_config("conf/demo.yaml", ["caption.backend=vllm", "caption.vllm.engine_kwargs.max_num_seqs=128"])
    processor = vllm_processor(cfg)
    stages = processor.list_stage_names()
    assert stages[0].startswith("PrepareMultimodal") and any("vLLM" in s for s in stages)


def test_vllm_requests_carry_the_transformers_pixel_budget():
    from pipelines.caption import vllm_engine_kwargs

    cfg = load_config("conf/prod.yaml", ["caption.backend=vllm", "caption.vllm.engine_kwargs.max_num_seqs=128"])
    kwargs = vllm_engine_kwargs(cfg)
    m = cfg.models.captioner
    assert kwargs["mm_processor_kwargs"] == {"min_pixels": m.image_min_pixels, "max_pixels": m.image_max_pixels}
    assert kwargs["max_num_seqs"] == 128 and kwargs["max_model_len"] == cfg.caption.vllm.max_model_len


def test_a_pixel_budget_that_overflows_max_model_len_is_refused():
    from pipelines.config import ConfigError

    with pytest.raises(ConfigError, match="caption.vllm.max_model_len"):
        load_config("conf/prod.yaml", ["caption.backend=vllm", "models.captioner.image_max_pixels=12845056"])


def test_running_the_vllm_backend_without_vllm_is_refused(tmp_path):
    from tests.conftest import run_stage

    with pytest.raises(ConfigError, match="needs the vllm package"):
        run_stage(load_config("conf/demo.yaml", [f"run_dir={tmp_path}", "caption.backend=vllm"]), "caption")
    with pytest.raises(ConfigError, match="caption.backend='tgi': expected one of transformers, vllm"):
        load_config("conf/demo.yaml", [f"run_dir={tmp_path}", "caption.backend=tgi"])


def test_the_stage_plumbing_around_the_engine(ray_local, batch):
    """Requests -> engine -> gathered rows, with a stand-in for the engine (it echoes
    each request's kind and image): what is tested is the Ray Data wiring around it,
    reject rows bypassing it and one captions row per image coming out."""
    import ray

    from ops.caption import OUTPUT_SCHEMA
    from pipelines.caption import _with_vllm
    from pipelines.context import RunContext

    def stand_in_engine(ds):
        return ds.map(vllm_request).map(lambda r: {**r, "generated_text": f"{r['kind']} of {r['image_id']}"}).map(
            vllm_result)

    cfg = load_config("conf/demo.yaml", ["caption.backend=vllm", "caption.num_actors=1", "caption.num_cpus_per_actor=1"])
    todo = ray.data.from_arrow(batch)
    out = _with_vllm(RunContext.create(cfg), todo, processor=stand_in_engine)
    rows = {r["image_id"]: r for r in out.take_all()}
    assert set(rows) == {"a", "b", "bad"}
    assert (rows["a"]["caption_long"], rows["a"]["caption_short"]) == ("long of a", "a red card")
    assert (rows["b"]["caption_short"], rows["b"]["caption_short_source"]) == ("short of b", "model")
    assert rows["bad"]["reject_reason"] and rows["bad"]["caption_long"] is None
    assert set(rows["a"]) == set(OUTPUT_SCHEMA.names)

