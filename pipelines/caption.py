"""Stage `caption`: images with no caption for their current sha256 (and model) -> `captions`."""
from __future__ import annotations

import pyarrow as pa

from ops.caption import (
    OUTPUT_SCHEMA,
    CaptionOp,
    CaptionRequestOp,
    captions_from_results,
    vllm_request,
    vllm_result,
)
from ops.schemas import CAPTIONS
from pipelines.common import (
    StageOutput,
    begin_model_stage,
    map_with_model,
    read_table,
    select_work,
    stage_and_commit,
)
from pipelines.config import ConfigError, plain
from pipelines.context import RunContext, Summary


def check_backend(cfg) -> None:
    """vllm importable where it is asked for (the config's rules checked the name)."""
    import importlib.util

    if cfg.caption.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "caption.backend=vllm needs the vllm package (in the image the cluster runs); "
            "it is not installed here: use caption.backend=transformers"
        )


def vllm_engine_kwargs(cfg) -> dict:
    """The captioner's vLLM engine arguments. The image processor gets the captioner's
    pixel budget (models.captioner.image_min/max_pixels), as the transformers backend
    does: without it Qwen's default allows 16,384 tokens an image, which overflows
    max_model_len and gives other captions than the transformers backend."""
    m, v = cfg.models.captioner, cfg.caption.vllm
    return {
        "dtype": m.dtype,
        "max_model_len": v.max_model_len,
        "limit_mm_per_prompt": {"image": 1},
        "mm_processor_kwargs": {"min_pixels": m.image_min_pixels, "max_pixels": m.image_max_pixels},
        **plain(v.engine_kwargs),
    }


def vllm_processor(cfg):
    """ray.data.llm's vLLM processor for the captioner: one engine per GPU actor
    (caption.num_actors), continuous batching inside it (caption.vllm.batch_size rows
    handed over at a time), greedy decoding."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    v = cfg.caption.vllm
    config = vLLMEngineProcessorConfig(
        model_source=cfg.models.captioner.name_or_path,
        engine_kwargs=vllm_engine_kwargs(cfg),
        batch_size=v.batch_size,
        concurrency=cfg.caption.num_actors,
        prepare_multimodal_stage=True,
    )
    return build_processor(config, preprocess=vllm_request, postprocess=vllm_result)


def _with_vllm(ctx: RunContext, todo, processor=None):
    """Requests (CPU tasks: load, check, one row per caption to write), the vLLM
    processor on the GPUs (`processor`: vllm_processor(cfg) unless given), then the
    results of each image gathered into its row."""
    cfg = ctx.cfg
    # Not rebatched: the groupby below gathers every result before a row is staged, so
    # small blocks would not make this path commit sooner, and their repartition tasks,
    # run once for each of the two branches below, starve for CPUs beside two actor pools.
    requests = map_with_model(todo, ctx, CaptionRequestOp, "caption", use_gpus=False, rebatch=False)
    ok = requests.filter(lambda r: r["reject_reason"] is None)
    rejected = requests.filter(lambda r: r["reject_reason"] is not None).map(
        lambda r: (
            {k: r[k] for k in ("image_id", "sha256", "kind", "source_caption", "reject_reason")}
            | {"text": None}
        )
    )
    results = (processor or vllm_processor(cfg))(ok).union(rejected)
    name = cfg.models.captioner.name_or_path
    return results.groupby("image_id").map_groups(
        lambda b: pa.Table.from_pylist([captions_from_results(b.to_pylist(), name)], schema=OUTPUT_SCHEMA),
        batch_format="pyarrow",
    )


def run(ctx: RunContext) -> Summary:
    check_backend(ctx.cfg)
    summary = begin_model_stage(ctx, "caption")
    if summary is None:
        return Summary("caption")
    lake = ctx.lake
    images = read_table(lake, "images", ["image_id", "uri", "sha256", "source_caption"])
    out = StageOutput("caption", OUTPUT_SCHEMA, "captions", ("image_id",), CAPTIONS)
    todo = select_work(ctx, summary, images, out, table="captions", compare={"sha256": "sha256"},
                       constants={"model": ctx.cfg.models.captioner.name_or_path})
    if todo is None:
        return summary
    if ctx.cfg.caption.backend == "vllm":
        staged = _with_vllm(ctx, todo)
    else:
        staged = map_with_model(todo, ctx, CaptionOp, "caption")
    counts = stage_and_commit(staged, ctx, out)
    summary.written, summary.rejected = counts["written"], counts["rejected"]
    summary.skipped = summary.read - summary.written - summary.rejected
    return summary
