"""Stage `caption`: images with no caption for their current sha256 (and model) -> `captions`."""
from __future__ import annotations

import pyarrow as pa
import ray

from ops.caption import OUTPUT_SCHEMA, CaptionOp, CaptionRequestOp, captions_from_results, vllm_request, vllm_result
from ops.schemas import CAPTIONS
from pipelines.common import StageSummary, begin_model_stage, plain, stage_and_commit
from pipelines.config import ConfigError
from pipelines.stages import any_rows, keep_changed, read_table


BACKENDS = ("transformers", "vllm")


def check_backend(cfg) -> None:
    """caption.backend is known, and vllm importable where it is asked for."""
    import importlib.util

    if cfg.caption.backend not in BACKENDS:
        raise ConfigError(f"caption.backend={cfg.caption.backend!r}: expected one of {', '.join(BACKENDS)}")
    if cfg.caption.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError("caption.backend=vllm needs the vllm package (in the image the cluster runs); "
                          "it is not installed here: use caption.backend=transformers")


def vllm_processor(cfg):
    """ray.data.llm's vLLM processor for the captioner: one engine per GPU actor
    (caption.num_actors), continuous batching inside it (caption.vllm.batch_size rows
    handed over at a time), greedy decoding."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    v = cfg.caption.vllm
    config = vLLMEngineProcessorConfig(
        model_source=cfg.models.captioner.name_or_path,
        engine_kwargs={"dtype": cfg.models.captioner.dtype, "max_model_len": v.max_model_len,
                       "limit_mm_per_prompt": {"image": 1}, **plain(v.engine_kwargs)},
        batch_size=v.batch_size, concurrency=cfg.caption.num_actors, prepare_multimodal_stage=True)
    return build_processor(config, preprocess=vllm_request, postprocess=vllm_result)


def _with_vllm(cfg, todo, lake, processor=None):
    """Requests (CPU tasks: load, check, one row per caption to write), the vLLM
    processor on the GPUs (`processor`: vllm_processor(cfg) unless given), then the
    results of each image gathered into its row."""
    requests = todo.map_batches(CaptionRequestOp, fn_constructor_kwargs=dict(caption=plain(cfg.caption), s3=lake.s3),
                                compute=ray.data.ActorPoolStrategy(size=cfg.caption.num_actors),
                                batch_size=cfg.caption.batch_size, batch_format="numpy",
                                num_cpus=cfg.caption.num_cpus_per_actor)
    ok = requests.filter(lambda r: r["reject_reason"] is None)
    rejected = requests.filter(lambda r: r["reject_reason"] is not None).map(
        lambda r: {k: r[k] for k in ("image_id", "sha256", "kind", "source_caption", "reject_reason")} | {"text": None})
    results = (processor or vllm_processor(cfg))(ok).union(rejected)
    name = cfg.models.captioner.name_or_path
    return results.groupby("image_id").map_groups(
        lambda b: pa.Table.from_pylist([captions_from_results(b.to_pylist(), name)], schema=OUTPUT_SCHEMA),
        batch_format="pyarrow")


def run(cfg) -> StageSummary:
    check_backend(cfg)
    started = begin_model_stage(cfg, "caption")
    if started is None:
        return StageSummary("caption")
    lake, summary = started
    model = cfg.models.captioner
    todo = read_table(lake, "images", ["image_id", "uri", "sha256", "source_caption"]).map_batches(
        keep_changed, batch_format="pyarrow", fn_kwargs=dict(
            table_uri=lake.uri("captions"), storage_options=lake.storage_options,
            compare={"sha256": "sha256"}, constants={"model": model.name_or_path}))
    if not any_rows(todo):
        summary.skipped = summary.read
        return summary
    if cfg.caption.backend == "vllm":
        staged = _with_vllm(cfg, todo, lake)
    else:
        staged = todo.map_batches(
            CaptionOp, fn_constructor_kwargs=dict(model=plain(model), caption=plain(cfg.caption), s3=lake.s3),
            compute=ray.data.ActorPoolStrategy(size=cfg.caption.num_actors), batch_size=cfg.caption.batch_size,
            batch_format="numpy", num_cpus=cfg.caption.num_cpus_per_actor, num_gpus=cfg.caption.num_gpus_per_actor)
    counts = stage_and_commit(staged, lake, "caption", OUTPUT_SCHEMA, "captions", ["image_id"], CAPTIONS)
    summary.written, summary.rejected = counts["written"], counts["rejected"]
    summary.skipped = summary.read - summary.written - summary.rejected
    return summary
