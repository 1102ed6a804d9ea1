"""The demo's world models (pipelines/synthetic.py train_world_models): tiny MLLMs taught
the synthetic world learn it. Held-out items (drawn apart from the training split) are
captioned and retrieved from their captions far better than by the random models."""
from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch

from model.mllm import Captioner, FusedEmbedder, load_mllm_from_conf
from pipelines.config import load_config, plain
from pipelines.synthetic import draw, random_item, train_world_models


def _attributes_named(items, captions) -> dict[str, float]:
    """Share of captions naming each attribute's true value (as a word)."""
    words = [set(c.replace(",", " ").split()) for c in captions]
    return {a: sum(getattr(it, a) in w for it, w in zip(items, words)) / len(items)
            for a in ("shape", "colour", "size", "position", "background")}


def test_world_models_learn_to_caption_and_embed_the_world(tmp_path, tiny_models):
    for name in ("world_mllm", "world_embedder"):
        shutil.copytree(tiny_models["mllm"], tmp_path / "models" / name)  # the random tiny model, as `synth` builds it
    cfg = load_config("conf/demo.yaml", [
        f"run_dir={tmp_path}", "tiny_models.world.lm_steps=450", "tiny_models.world.embedder_steps=150",
        "tiny_models.world.num_items=500"])
    rng = random.Random(12345)
    items = [random_item(rng) for _ in range(32)]
    images = [draw(it, cfg.synthetic.image_size, rng) for it in items]

    def measure():
        cap = Captioner(load_mllm_from_conf(plain(cfg.models.captioner)))
        named = _attributes_named(items, cap.caption(images, cfg.caption.prompt_short, 24))
        emb = FusedEmbedder.from_conf(plain(cfg.models.embedder))
        scores = emb.embed(texts=[it.caption() for it in items], side="query") @ emb.embed(images=images).t()
        hit = (scores.topk(5, dim=1).indices == torch.arange(len(items))[:, None]).any(1)
        return named, float(hit.float().mean())

    random_named, random_r5 = measure()
    losses = train_world_models(cfg, [cfg.models.captioner.name_or_path, cfg.models.embedder.name_or_path])
    assert set(losses) == {f"{tmp_path}/models/world_mllm (lm)", f"{tmp_path}/models/world_embedder (embedder)"}
    made = json.load(open(os.path.join(tmp_path, "models", "world_mllm", "world.json")))
    assert (made["lm_steps"], made["embedder_steps"]) == (450, 0)
    named, r5 = measure()
    # Seen after 450 steps: background 1.0, the others 0.28 to 0.47 (chance 1/6 to 1/2:
    # colour and shape come later, ~1,500 steps); the random model names none.
    assert max(random_named.values()) < 0.2, random_named
    assert named["background"] >= 0.8, named
    assert sum(named.values()) / len(named) >= 0.4, named
    # Text-to-image R@5 over 32 held-out items (chance 5/32 = 0.16).
    assert r5 >= 2 * max(random_r5, 5 / 32), (random_r5, r5)
    # A path that was not built now is never trained.
    assert train_world_models(cfg, []) == {}
