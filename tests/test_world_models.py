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
from pipelines.config import load_config, model_source, plain
from pipelines.synthetic import (draw, held_out_items, make_catalogue, random_item, training_edit,
                                 train_world_models)


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

    # The demo's embedder is the fine-tuned one; the world embedder is what it starts from.
    world_embedder = model_source(cfg, "embedder")
    assert world_embedder == cfg.finetune_embedder.base

    def r5(queries, candidates) -> float:
        hit = ((queries @ candidates.t()).topk(5, dim=1).indices == torch.arange(len(items))[:, None]).any(1)
        return float(hit.float().mean())

    def measure():
        cap = Captioner(load_mllm_from_conf(plain(cfg.models.captioner)))
        named = _attributes_named(items, cap.caption(images, cfg.caption.prompt_short, 24))
        emb = FusedEmbedder.from_conf({**plain(cfg.models.embedder), "name_or_path": world_embedder})
        alone, captions = emb.embed(images=images), [it.caption() for it in items]
        # Text -> image, and an image with its caption (Stage 1's fused vector) -> the image alone.
        return named, r5(emb.embed(texts=captions, side="query"), alone), r5(emb.embed(images, captions), alone)

    random_named, random_r5, random_pair_r5 = measure()
    losses = train_world_models(cfg, [cfg.models.captioner.name_or_path, world_embedder])
    assert set(losses) == {f"{tmp_path}/models/world_mllm (lm)", f"{tmp_path}/models/world_embedder (embedder)"}
    made = json.load(open(os.path.join(tmp_path, "models", "world_mllm", "world.json")))
    assert (made["lm_steps"], made["embedder_steps"]) == (450, 0)
    # The embedder starts from the MLLM the same call taught, as GME from Qwen2-VL.
    made = json.load(open(os.path.join(world_embedder, "world.json")))
    assert made["started_from"] == cfg.models.captioner.name_or_path and made["embedder_steps"] == 150
    named, text_r5, pair_r5 = measure()
    # Seen after 450 steps: background 1.0, the others 0.28 to 0.47 (chance 1/6 to 1/2:
    # colour and shape come later, ~1,500 steps); the random model names none.
    assert max(random_named.values()) < 0.2, random_named
    assert named["background"] >= 0.8, named
    assert sum(named.values()) / len(named) >= 0.4, named
    # R@5 over 32 held-out items (chance 5/32 = 0.16).
    assert text_r5 >= 2 * max(random_r5, 5 / 32), (random_r5, text_r5)
    # A random model's fused vector is its image's already (the image's tokens dominate);
    # teaching text -> image must keep it so (seen: 1.0 before, 0.97 after).
    assert random_pair_r5 >= 0.9 and pair_r5 >= 0.9, (random_pair_r5, pair_r5)
    # A path that was not built now is never trained.
    assert train_world_models(cfg, []) == {}


@pytest.mark.fast
def test_no_training_row_holds_a_held_out_query_item(tmp_path):
    """The demo's queries are new to every model: neither their references nor their
    targets are in the world models' training split or in the triplets."""
    uris = make_catalogue(str(tmp_path), num_images=40, image_size=32, num_triplets=60, num_queries=15, seed=3)
    import pyarrow.parquet as pq

    manifest = {r["image_id"]: r for r in pq.read_table(uris["manifest"]).to_pylist()}
    queries = pq.read_table(uris["queries"]).to_pylist()
    held = held_out_items(15, 3)
    names = ("shape", "colour", "size", "position", "background")
    asked = {tuple(manifest[q[k]][n] for n in names) for q in queries for k in ("reference_id", "target_id")}
    assert asked == {tuple(getattr(it, n) for n in names) for it in held} and len(held) == 30
    # Every query's target is its reference with one attribute changed, and is unique in the gallery.
    for q in queries:
        ref, tgt = manifest[q["reference_id"]], manifest[q["target_id"]]
        assert sum(ref[n] != tgt[n] for n in names) == 1
        assert sum(all(m[n] == tgt[n] for n in names) for m in manifest.values()) == 1
    descriptions = {r["target_description"] for r in pq.read_table(uris["triplets"]).to_pylist()}
    assert not descriptions & {it.description() for it in held}
    rng = random.Random(0)
    for _ in range(500):
        src, _, _, tgt = training_edit(rng, held)
        assert src not in held and tgt not in held


@pytest.mark.fast
def test_the_language_modelling_loss_scores_the_answers_alone(tiny_models):
    """caption_loss projects only the answer columns onto the vocabulary; its loss is the
    mean cross-entropy of every answer token (end token included) computed from the
    model's logits at every position, and nothing of the prompt is scored."""
    import torch.nn.functional as F

    from model.lm_loss import caption_loss
    from model.mllm import _user_turn

    cfg = load_config("conf/demo.yaml", [f"models.captioner.name_or_path={tiny_models['mllm']}"])
    mllm = load_mllm_from_conf(plain(cfg.models.captioner))
    rng = random.Random(3)
    items = [random_item(rng) for _ in range(3)]
    images = [draw(it, cfg.synthetic.image_size, rng) for it in items]
    prompts = [cfg.caption.prompt_short, cfg.caption.prompt_long, "Describe it after: make it red."]
    answers = [items[0].caption(), items[1].description(), "a red circle"]
    got = caption_loss(mllm, images, prompts, answers)

    tok, nll, count = mllm.tokenizer, 0.0, 0
    with torch.no_grad():
        for image, prompt, answer in zip(images, prompts, answers):
            batch = mllm.encode([[_user_turn(image, prompt)]], [image], add_generation_prompt=True)
            ids = tok(answer + tok.eos_token, add_special_tokens=False)["input_ids"]
            full = {**batch, "input_ids": torch.cat([batch["input_ids"], torch.tensor([ids])], 1),
                    "attention_mask": torch.ones(1, batch["input_ids"].shape[1] + len(ids), dtype=torch.long),
                    "mm_token_type_ids": torch.cat([batch["mm_token_type_ids"], torch.zeros(1, len(ids),
                                                                                           dtype=torch.long)], 1)}
            logits = mllm.model(**full, use_cache=False).logits[0]
            start = batch["input_ids"].shape[1]
            nll += float(F.cross_entropy(logits[start - 1:-1], torch.tensor(ids), reduction="sum"))
            count += len(ids)
    assert got.item() == pytest.approx(nll / count, rel=1e-4)
