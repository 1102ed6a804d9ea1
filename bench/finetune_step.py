"""Where a training step of the demo's tiny MLLMs goes on a CPU, and what each of the
three changes to it saves: the step of `finetune_embedder` (MVFT-JI's joint loss,
model/contrastive.py) and the world model's language-modelling step (model/lm_loss.py).

    .venv/bin/python bench/finetune_step.py RUN_DIR [STEPS] [key=value ...]

RUN_DIR is a finished demo run (runs/demo after `make demo`): its lake, triplets and
world models. Each variant runs STEPS (default 20) steps, forward, backward and AdamW,
over the same few batches met again (their processed inputs kept, as from the second
epoch on), and prints its median ms a step and its first loss:

- `vision attention`: per_image (transformers': one sdpa call per image per layer) or
  padded (model/vision_attention.py: one call per layer);
- `patch embedding`: transformers' Conv3d, or `LinearPatchEmbed` (the same sums as one
  matrix product), which `load_mllm` puts in every tower;
- `forwards` (fine-tuning only): the five groups of rows (images, captions, pairs,
  composed queries, target texts) embedded in a call each, or in one (joint_loss).

The losses of a step's variants agree to float rounding; the last line is a JSON record.
The describer's prompt length in the world model's tokenizer is printed too: a tokenizer
that never met the templates spells them letter by letter (pipelines/synthetic.py).
"""
from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time

import torch

from model.contrastive import JointTasks, info_nce, joint_loss
from model.lm_loss import caption_loss
from model.mllm import FusedEmbedder, load_mllm_from_conf
from model.vision_attention import LinearPatchEmbed
from ops.rank import describe_prompt
from pipelines.config import load_config, plain
from pipelines.synthetic import _lm_example, _world_rows

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.input_cache import finetune_batches, run_cli  # noqa: E402

BATCHES = 3


def conv_patch_embed(model: torch.nn.Module) -> None:
    """transformers' own patch embedding back in place (the Conv3d LinearPatchEmbed holds)."""
    for module in list(model.modules()):
        if isinstance(getattr(module, "patch_embed", None), LinearPatchEmbed):
            module.patch_embed = module.patch_embed.original[0]


def per_group_loss(embedder: FusedEmbedder, tasks: JointTasks, b: dict) -> torch.Tensor:
    """joint_loss's sum with each group of rows embedded in a call of its own."""
    n = len(b["caption_texts"])

    def v(images, texts, side, keys):
        return embedder.trainable_vectors(images=images, texts=texts, side=side, image_keys=keys)

    images = v(b["caption_images"], None, "candidate", b["caption_image_keys"])
    captions = v(None, b["caption_texts"], "query", [None] * n)
    pairs = v(b["caption_images"], b["caption_texts"], "candidate", b["caption_image_keys"])
    queries = v(b["references"], b["modifications"], "query", b["reference_keys"])
    targets = v(None, b["target_texts"], "candidate", [None] * len(b["target_texts"]))
    t = tasks.temperature
    return (tasks.weight_text_to_image * info_nce(captions, images, t)
            + tasks.weight_pair_to_image * info_nce(pairs, images, t)
            + tasks.weight_target_text * info_nce(queries, targets, t))


def timed(model: torch.nn.Module, step_loss, steps: int) -> tuple[float, float]:
    """(median ms a step after two warm-up steps, the first step's loss)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    times, first = [], None
    for i in range(steps + 2):
        start = time.perf_counter()
        loss = step_loss(i)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append((time.perf_counter() - start) * 1000)
        first = loss.item() if first is None else first
    return round(statistics.median(times), 1), round(first, 5)


def main(run_dir: str, steps: int, overrides: list[str]) -> dict:
    cfg = load_config(["conf/demo.yaml"], [f"run_dir={run_dir}", *overrides])
    torch.set_num_threads(cfg.ray.num_cpus)
    f = cfg.finetune_embedder
    tasks = JointTasks.from_conf(plain(f))
    batches = finetune_batches(cfg, BATCHES)
    rng = random.Random(cfg.seed)
    world = _world_rows(cfg, BATCHES * cfg.tiny_models.world.batch_size, rng)
    lm_rows = [[_lm_example(cfg, r, rng) for r in world[i::BATCHES]] for i in range(BATCHES)]
    out = {"steps": steps, "threads": torch.get_num_threads(), "finetune": {}, "lm": {}}
    for attention in ("per_image", "padded"):
        for patch in ("conv3d", "linear"):
            conf = {**plain(cfg.models.embedder), "name_or_path": f.base, "vision_attention": attention,
                    "input_cache_rows": 10_000}
            for forwards in ("per group", "one"):
                torch.manual_seed(cfg.seed)
                embedder = FusedEmbedder.from_conf(conf)
                if patch == "conv3d":
                    conv_patch_embed(embedder.mllm.model)
                embedder.mllm.model.train()
                loss = (lambda i: joint_loss(embedder, tasks, **batches[i % BATCHES])[0]) if forwards == "one" \
                    else (lambda i: per_group_loss(embedder, tasks, batches[i % BATCHES]))
                ms, first = timed(embedder.mllm.model, loss, steps)
                key = f"{attention}, {patch}, {forwards} forward(s)"
                out["finetune"][key] = {"ms": ms, "loss": first}
                print(f"finetune step ({key}): {ms} ms, loss {first}", flush=True)
            torch.manual_seed(cfg.seed)
            mllm = load_mllm_from_conf({**plain(cfg.models.captioner), "vision_attention": attention,
                                        "input_cache_rows": 10_000})
            if patch == "conv3d":
                conv_patch_embed(mllm.model)
            mllm.model.train()

            def lm_loss(i: int) -> torch.Tensor:
                images, prompts, answers = zip(*lm_rows[i % BATCHES])
                return caption_loss(mllm, images, prompts, answers,
                                    image_keys=[(i % BATCHES, j) for j in range(len(images))])

            ms, first = timed(mllm.model, lm_loss, steps)
            key = f"{attention}, {patch}"
            out["lm"][key] = {"ms": ms, "loss": first}
            print(f"world model lm step ({key}): {ms} ms, loss {first}", flush=True)
    tok = mllm.tokenizer
    prompt = describe_prompt(cfg.rank.describe_template, cfg.rank.describe_template_no_concept,
                             "change the background to grey", "circle")
    out["describe_prompt_tokens"] = len(tok(prompt)["input_ids"])
    print(f"the describer's prompt: {out['describe_prompt_tokens']} tokens", flush=True)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    run_cli(main, 20, __doc__)
