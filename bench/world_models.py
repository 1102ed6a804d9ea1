"""What the demo's world models see: teach them (or reuse them) and measure, on the
catalogue's held-out query references, how often the describer and the short captions
name each attribute's true value, and how well the world embedder (and its fine-tuning by
`finetune_embedder`, once the nightly has made one) retrieves 200 distinct items from
their descriptions (text -> image) and from their fused vectors (image + description ->
image alone: the space Stage 1 learns, ranked against gallery images).

    .venv/bin/python bench/world_models.py RUN_DIR [key=value ...]

RUN_DIR's models/ are built and taught where missing (conf/demo.yaml's tiny_models),
reused where present (runs/demo after `make demo`). Prints one line per measure.
"""
from __future__ import annotations

import random
import sys
import time

import torch

from model.mllm import Captioner, FusedEmbedder, load_mllm_from_conf
from ops.rank import describe_prompt
from pipelines.config import load_config, model_source, plain
from pipelines.synthetic import ATTRIBUTES, build_demo_models, draw, draw_queries, instruction, random_item

QUERIES, GALLERY = 64, 200


def named(items, texts) -> dict[str, float]:
    """Share of texts naming each attribute's true value, as a word."""
    words = [set(t.replace(".", " ").replace(",", " ").split()) for t in texts]
    return {a: round(sum(getattr(it, a) in w for it, w in zip(items, words)) / len(items), 2)
            for a in ATTRIBUTES}


def recall(queries: torch.Tensor, candidates: torch.Tensor) -> tuple[float, float]:
    rank = ((queries @ candidates.t()).argsort(1, descending=True) == torch.arange(len(queries))[:, None])
    rank = rank.float().argmax(1)
    return round(float((rank < 1).float().mean()), 3), round(float((rank < 10).float().mean()), 3)


def main(run_dir: str, overrides: list[str]) -> None:
    cfg = load_config("conf/demo.yaml", [f"run_dir={run_dir}", *overrides])
    t0 = time.time()
    build_demo_models(cfg)
    print(f"[world models] ready in {time.time() - t0:.0f}s", flush=True)
    rng, size = random.Random(4242), cfg.synthetic.image_size
    queries = draw_queries(random.Random(cfg.seed), cfg.synthetic.num_queries)[:QUERIES]
    images = [draw(ref, size, rng) for ref, _, _, _ in queries]
    describer = Captioner(load_mllm_from_conf({**plain(cfg.models.describer),
                                               "name_or_path": model_source(cfg, "describer")}))
    r = cfg.rank
    # CIRR's layout carries no shared concept, so the benchmark's prompts have none either.
    prompts = [describe_prompt(r.describe_template, r.describe_template_no_concept, instruction(a, v), None)
               for _, a, v, _ in queries]
    written = describer.generate(images, prompts, r.describe_max_new_tokens)
    print(f"describer, target's attributes named ({QUERIES} held-out edits): "
          f"{named([t for *_, t in queries], written)}")
    print(f"  e.g. {written[0]!r}; truth {queries[0][3].description()!r}")
    short = describer.caption(images, cfg.caption.prompt_short, cfg.caption.max_new_tokens_short)
    print(f"short captions, reference's attributes named: {named([q[0] for q in queries], short)}")
    items = list(dict.fromkeys(random_item(rng) for _ in range(4 * GALLERY)))[:GALLERY]
    gallery = [draw(it, size, rng) for it in items]
    texts = [it.description() for it in items]
    # The world embedder, and MVFT-JI's fine-tuning of it where the nightly has written
    # one: Fusion-Diff's samples live where the pairs are, so image + text -> image is
    # what its full and prior_only modes can reach at best.
    sources = {"world embedder": cfg.finetune_embedder.base}
    if model_source(cfg, "embedder") != cfg.finetune_embedder.base:
        sources["fine-tuned"] = model_source(cfg, "embedder")
    for name, path in sources.items():
        embedder = FusedEmbedder.from_conf({**plain(cfg.models.embedder), "name_or_path": path})
        alone = embedder.embed(images=gallery)
        print(f"{name} over {GALLERY} distinct items, (R@1, R@10): text -> image "
              f"{recall(embedder.embed(texts=texts, side='query'), alone)}, image + text -> image "
              f"{recall(embedder.embed(images=gallery, texts=texts), alone)}", flush=True)

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
