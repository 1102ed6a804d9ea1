"""GPU throughput of the four workloads the nightly bill is made of, at real model sizes.

Sampling (DiT-XL/2 prior + Control-Adapter, 14 DPM-Solver++ steps, guidance), a Stage 1
training step, fused embedding (GME-Qwen2-VL-2B's architecture, 448x448 image + a text)
and captioning (Qwen2.5-VL-7B's architecture, 120 new tokens), each through the
project's own model/ and ops/ code (GuidedSampler, accumulate_gradients/apply_step, FusedEmbedder,
Captioner) with random weights built from the architectures in conf `gpu_bench` (no
hub). Every variant a stage can be switched to in conf is measured beside the plain
one; compiled sampling is also compared with eager sampling on the same noise.

One JSON of figures (throughput, peak memory, settings, versions) is rewritten after
every measurement, so a run cut short keeps what it measured:
<gpu_bench.out_dir>/<date>_<gpu>_<sections>.json.

    python -m bench.gpu --config conf/prod.yaml                         # all four, on the GPU
    python -m bench.gpu --config conf/prod.yaml --only sampling training
    .venv/bin/python -m bench.gpu --config conf/demo.yaml --config conf/bench/gpu_tiny.yaml --device cpu  # the script's own check
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import re
import statistics
import time

import numpy as np
import torch
from PIL import Image

SECTIONS = ("sampling", "training", "embedding", "captioning")


class Recorder:
    """Holds the figures and rewrites the JSON after every measurement; keeps the budget."""

    def __init__(self, path: str, header: dict, budget_s: float):
        self.path, self.doc, self.deadline = path, {**header, "results": {}}, time.monotonic() + budget_s
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def add(self, section: str, row: dict) -> None:
        self.doc["results"].setdefault(section, []).append(row)
        print(json.dumps({"section": section, **row}), flush=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.doc, f, indent=1)
        os.replace(tmp, self.path)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, repeats: int, device: torch.device, warmups: int = 1) -> float:
    """Median wall time of fn() after `warmups` untimed calls (compilation, CUDA graph
    capture and allocator growth happen there)."""
    for _ in range(warmups):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if device.type == "cuda" else None


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def guarded(rec: Recorder, section: str, settings: dict, fn) -> dict | None:
    """Runs one measurement; out-of-memory and out-of-time are recorded, not raised."""
    if rec.out_of_time():
        rec.add(section, {**settings, "skipped": "budget spent"})
        return None
    try:
        row = {**settings, **fn()}
    except torch.OutOfMemoryError as e:
        row = {**settings, "error": f"out of memory: {str(e).splitlines()[0]}"}
    except Exception as e:  # one variant failing (a compile error, say) must not end the run
        row = {**settings, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]}
    rec.add(section, row)
    return row


def top_ops(fn, device: torch.device, k: int) -> list[dict]:
    """The k operators of one fn() call that took the most time on the device (self time,
    CUDA kernels on a GPU, CPU otherwise), with their share of the call."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    events = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, key) for e in events) or 1.0
    ranked = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:k]
    return [{"op": e.key[:80], "self_ms": round(getattr(e, key) / 1e3, 2), "calls": e.count,
             "share": round(getattr(e, key) / total, 3)} for e in ranked]


def with_profile(row: dict, fn, device: torch.device, k: int) -> dict:
    """row with the top-k operators of one more fn() call (conf gpu_bench.profile_top; 0: none)."""
    return {**row, "top_ops": top_ops(fn, device, k)} if k else row


# -- sampling -------------------------------------------------------------------------
def bench_sampling(cfg, rec: Recorder, device: torch.device, dtype: str) -> None:
    from bench.sample_speed import build
    from model.diffusion import DiffusionConfig, GuidedSampler, SamplerConfig
    from pipelines.config import plain

    sc = cfg.gpu_bench.sampling
    prior, adapter = build(cfg, sc.cond_dim, str(device), dtype)
    diffusion = DiffusionConfig(**plain(cfg.diffusion))
    k, d = cfg.models.text_encoder.max_tokens, prior.config.d_vl
    flops = _sampling_tflop_per_query(prior, adapter, cfg.sampling.num_steps, k)
    reference = {}
    for mode in sc.compile:
        sampler = GuidedSampler(diffusion, SamplerConfig(**{**plain(cfg.sampling), "compile": mode}))
        for b in sc.batches:
            g = torch.Generator(device=device).manual_seed(b)
            c = torch.randn(b, k, sc.cond_dim, device=device, generator=g).to(prior.dtype)
            m = torch.ones(b, k, dtype=torch.bool, device=device)
            zq = torch.nn.functional.normalize(torch.randn(b, d, device=device, generator=g), dim=-1).to(prior.dtype)

            def run():
                return sampler.sample(prior, c, m, adapter, zq, generator=torch.Generator(device=device).manual_seed(0))

            def measure():
                reset_memory(device)
                started = time.perf_counter()
                out = run()  # same noise every call: this output is every call's
                first = time.perf_counter() - started
                sec = median_seconds(run, sc.repeats, device, warmups=1)
                row = {"queries_per_s": round(b / sec, 2), "tflop_per_s": round(flops * b / sec, 1),
                       "first_call_s": round(first, 1), "peak_mem_gib": peak_gib(device)}
                if mode == sc.compile[0]:
                    reference[b] = out
                elif b in reference:
                    cos = torch.nn.functional.cosine_similarity(out.float(), reference[b].float(), dim=-1)
                    row["min_cosine_vs_" + sc.compile[0]] = round(float(cos.min()), 5)
                return with_profile(row, run, device, cfg.gpu_bench.profile_top)

            guarded(rec, "sampling", {"compile": mode, "batch": b, "steps": cfg.sampling.num_steps,
                                      "guidance": cfg.sampling.guidance_scale, "dtype": dtype}, measure)
        torch._dynamo.reset()


def _block_macs(prior_cfg, cond_tokens: int) -> float:
    """Multiply-adds of one FusionDiffBlock on one row (embeddings and heads left out)."""
    t = (prior_cfg.map_size // prior_cfg.patch_size) ** 2
    h, r, kc = prior_cfg.hidden_size, prior_cfg.mlp_ratio, cond_tokens + 1
    return (t * (6 + 2 * r) * h * h      # q/kv/out of self-attention, q/out of cross-attention, FFN
            + kc * 2 * h * h             # cross-attention's keys and values of the text tokens
            + 2 * t * t * h + 2 * t * kc * h  # the attention products
            + 9 * h * h)                 # AdaLN, once per row


def _sampling_tflop_per_query(prior, adapter, steps: int, cond_tokens: int) -> float:
    """Matrix-product TFLOP of one query: per step, the prior's blocks on both halves of
    guidance and the adapter's on the conditional half."""
    cfg = prior.config
    blocks = 2 * (cfg.num_encoder_blocks + cfg.num_decoder_blocks) + len(adapter.control_blocks)
    return steps * 2 * _block_macs(cfg, cond_tokens) * blocks / 1e12


# -- training -------------------------------------------------------------------------
def bench_training(cfg, rec: Recorder, device: torch.device) -> None:
    from bench.train_speed import time_batch
    from model.diffusion import DiffusionConfig
    from model.prior import FusionDiffPrior, compile_blocks, compile_mode
    from model.training import OptimConfig
    from pipelines.config import plain

    tc = cfg.gpu_bench.training
    diffusion = DiffusionConfig(**plain(cfg.diffusion))
    optim = OptimConfig.from_conf(plain(cfg.train_stage1))
    k = cfg.models.text_encoder.max_tokens
    for compile_name, fused in tc.variants:
        for b in tc.batches:
            def measure():
                reset_memory(device)
                with torch.device(device):
                    prior = FusionDiffPrior(d_vl=cfg.models.embedder.dim, cond_dim=tc.cond_dim, **plain(cfg.prior))
                if compile_name != "none":
                    compile_blocks(prior, compile_mode(compile_name, "train.compile"))
                started = time.perf_counter()
                row = time_batch(prior, diffusion, optim, b, k, tc.cond_dim, tc.steps,
                                 autocast=device.type == "cuda", fused=bool(fused),
                                 profile=lambda step: with_profile({}, step, device, cfg.gpu_bench.profile_top))
                row.pop("batch")
                # The backward pass costs twice the forward.
                blocks = cfg.prior.num_encoder_blocks + cfg.prior.num_decoder_blocks
                row["tflop_per_s"] = round(row["samples_per_s"] * 3 * 2 * _block_macs(prior.config, k) * blocks / 1e12, 1)
                row["wall_s"] = round(time.perf_counter() - started, 1)
                return row

            guarded(rec, "training", {"compile": compile_name, "fused_optimizer": bool(fused), "batch": b,
                                      "autocast_bf16": device.type == "cuda"}, measure)
        torch._dynamo.reset()


# -- the two MLLM workloads -----------------------------------------------------------
def random_mllm(section, cfg, role: str, device: torch.device, dtype: str, attn: str):
    """An MLLM of the section's architecture with random weights, and a processor whose
    tokenizer is trained here (its ids are small; the model keeps the real vocabulary)."""
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig, Qwen2VLConfig

    from model.mllm import MLLM, torch_dtype
    from model.tiny import tiny_processor
    from pipelines.config import plain
    from pipelines.synthetic import tokenizer_corpus

    m = cfg.models[role]
    corpus = tokenizer_corpus() + [cfg.caption.prompt_long, cfg.models.embedder.query_instruction]
    processor, ids = tiny_processor(corpus, cfg.tiny_models.mllm.vocab_size, m.image_min_pixels, m.image_max_pixels)
    t = plain(section.text)
    head_dim = t["hidden_size"] // t["num_attention_heads"]
    if sum(t["mrope_section"]) * 2 != head_dim:
        raise ValueError(f"gpu_bench.{role}: mrope_section {t['mrope_section']} must sum to head_dim/2 = {head_dim // 2}")
    text = dict(hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
                num_hidden_layers=t["num_hidden_layers"], num_attention_heads=t["num_attention_heads"],
                num_key_value_heads=t["num_key_value_heads"], vocab_size=t["vocab_size"],
                rope_parameters={"rope_type": "default", "rope_theta": t["rope_theta"], "mrope_section": t["mrope_section"]},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = plain(section.vision)
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if section.architecture == "qwen2_vl":
        config = Qwen2VLConfig(text_config=text, vision_config={**vision, "hidden_size": t["hidden_size"]}, **tokens)
    elif section.architecture == "qwen2_5_vl":
        config = Qwen2_5_VLConfig(text_config=text, vision_config={**vision, "out_hidden_size": t["hidden_size"]}, **tokens)
    else:
        raise ValueError(f"gpu_bench.{role}.architecture={section.architecture!r}: expected qwen2_vl or qwen2_5_vl")
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch_dtype(dtype), attn_implementation=attn)
    model.eval()
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    mllm = MLLM(model, processor, f"random {section.architecture}", device, m.image_min_pixels, m.image_max_pixels)
    return mllm, sum(p.numel() for p in model.parameters())


def random_images(n: int, sizes, seed: int) -> list[Image.Image]:
    """n noise images, their (width, height) taken from `sizes` in turn (an int: square)."""
    rng = np.random.default_rng(seed)
    sizes = [(sizes, sizes)] if isinstance(sizes, int) else [tuple(s) for s in sizes]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            for w, h in (sizes[i % len(sizes)] for i in range(n))]


def text_of_tokens(tokenizer, n: int) -> str:
    """A text the tokenizer cuts into n tokens (+-1), from the catalogue's own words."""
    words = "a small red cube beside a large blue sphere on a wooden table under soft light".split()
    text = ""
    i = 0
    while len(tokenizer(text).input_ids) < n:
        text = f"{text} {words[i % len(words)]}".strip()
        i += 1
    return text


def bench_embedding(cfg, rec: Recorder, device: torch.device, dtype: str) -> None:
    from model.mllm import FusedEmbedder
    from model.vision_attention import set_vision_attention

    es = cfg.gpu_bench.embedding
    mllm, params = random_mllm(es, cfg, "embedder", device, dtype, cfg.models.embedder.attn_implementation)
    text = text_of_tokens(mllm.tokenizer, es.text_tokens)
    for work in es.workloads:
        mllm.image_min_pixels, mllm.image_max_pixels = work.min_pixels, work.max_pixels
        for threads, on_device, parts, attention in es.variants:
            mllm.set_preprocessing(threads, bool(on_device))
            set_vision_attention(mllm.model, attention)
            e = cfg.models.embedder
            embedder = FusedEmbedder(mllm, e.query_instruction, e.candidate_instruction, e.end_token, parts,
                                     e.max_tokens, e.position_ids)
            for b in work.batches:
                images = random_images(b, work.sizes, b)
                texts = [text] * b

                def measure():
                    reset_memory(device)
                    sec = median_seconds(lambda: embedder.embed(images=images, texts=texts), es.repeats, device)
                    # What of that is the processor (CPU), and what the vision tower alone (GPU).
                    conv = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]] * b
                    pre = median_seconds(lambda: mllm.encode(conv, images, add_generation_prompt=True),
                                         es.repeats, device)
                    batch = mllm.encode(conv, images, add_generation_prompt=True)

                    def vision():
                        with torch.inference_mode():
                            return mllm.model.base_model.get_image_features(
                                batch["pixel_values"], batch["image_grid_thw"])

                    vis = median_seconds(vision, es.repeats, device)
                    grid = batch["image_grid_thw"]
                    row = {"items_per_s": round(b / sec, 2), "vision_items_per_s": round(b / vis, 2),
                           "preprocess_share": round(pre / sec, 3), "vision_share": round(vis / sec, 3),
                           "image_tokens_mean": round(float((grid.prod(-1) / 4).float().mean()), 1),
                           "sequence_tokens": int(batch["input_ids"].shape[1]),
                           "params_m": round(params / 1e6), "peak_mem_gib": peak_gib(device)}
                    return with_profile(row, vision, device, cfg.gpu_bench.profile_top)

                guarded(rec, "embedding", {"workload": work.name, "preprocess_threads": threads,
                                           "normalize_on_device": bool(on_device), "overlap_parts": parts,
                                           "vision_attention": attention, "batch": b,
                                           "text_tokens": es.text_tokens,
                                           "attn_implementation": cfg.models.embedder.attn_implementation,
                                           "dtype": dtype}, measure)


def bench_captioning(cfg, rec: Recorder, device: torch.device, dtype: str) -> None:
    from model.mllm import Captioner

    cs = cfg.gpu_bench.captioning
    mllm, params = random_mllm(cs, cfg, "captioner", device, dtype, cfg.models.captioner.attn_implementation)
    mllm.set_preprocessing(cfg.models.captioner.preprocess_threads, cfg.models.captioner.normalize_on_device)
    pad = mllm.tokenizer.pad_token_id
    for kv_cache, b in cs.variants:
        captioner = Captioner(mllm, kv_cache)
        images = random_images(b, cs.image_side, b)
        prompts = [cfg.caption.prompt_long] * b
        counted = {}

        def run():
            ids = captioner.generate_ids(images, prompts, cs.new_tokens, min_new_tokens=cs.new_tokens)
            counted["tokens"] = int((ids != pad).sum())

        def measure():
            reset_memory(device)
            started = time.perf_counter()
            run()
            first = time.perf_counter() - started
            sec = median_seconds(run, cs.repeats, device, warmups=0)
            # Where the time goes: the first token (vision tower + prefill), then each
            # decoding step of the whole batch.
            prefill = median_seconds(lambda: captioner.generate_ids(images, prompts, 1), cs.repeats, device)
            row = {"tokens_per_s": round(counted["tokens"] / sec, 1), "images_per_s": round(b / sec, 2),
                   "new_tokens": counted["tokens"] // b, "first_call_s": round(first, 1),
                   "prefill_s": round(prefill, 3), "prefill_share": round(prefill / sec, 3),
                   "decode_ms_per_step": round(1e3 * (sec - prefill) / max(cs.new_tokens - 1, 1), 2),
                   "params_m": round(params / 1e6), "peak_mem_gib": peak_gib(device)}
            return with_profile(row, run, device, cfg.gpu_bench.profile_top)

        guarded(rec, "captioning", {"kv_cache": kv_cache, "batch": b, "image_side": cs.image_side,
                                    "preprocess_threads": mllm.preprocess_threads,
                                    "normalize_on_device": mllm.normalize_on_device, "dtype": dtype}, measure)
        torch._dynamo.reset()


def main() -> None:
    import transformers

    from pipelines.config import BASE, BENCH_SCHEMA, load_config, plain

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=None)
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", help="weights of sampling and the MLLMs (training: fp32 + autocast)")
    ap.add_argument("--out-dir", default=None, help="default: gpu_bench.out_dir")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()
    cfg = load_config(args.config or ["conf/prod.yaml"], args.overrides, schemas=(BASE, BENCH_SCHEMA))
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 parts of training (optimizer, loss)
        name = torch.cuda.get_device_name()
    else:
        name = "cpu"
    date = datetime.date.today().isoformat()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")
    path = os.path.join(args.out_dir or cfg.gpu_bench.out_dir, f"{date}_{slug}_{'-'.join(args.only)}.json")
    header = {"gpu": name, "date": date, "torch": torch.__version__, "transformers": transformers.__version__,
              "settings": {s: plain(cfg.gpu_bench[s]) for s in args.only},
              "sampling_config": plain(cfg.sampling), "prior": plain(cfg.prior)}
    rec = Recorder(path, header, cfg.gpu_bench.budget_s)
    started = time.monotonic()
    for section in args.only:
        if section == "sampling":
            bench_sampling(cfg, rec, device, args.dtype)
        elif section == "training":
            bench_training(cfg, rec, device)
        elif section == "embedding":
            bench_embedding(cfg, rec, device, args.dtype)
        else:
            bench_captioning(cfg, rec, device, args.dtype)
        reset_memory(device)
    rows = sum(len(v) for v in rec.doc["results"].values())
    print(f"[gpu bench] {rows} measurements of {', '.join(args.only)} in {time.monotonic() - started:.0f}s -> {path}")


if __name__ == "__main__":
    main()
