"""MVFT-JI's loss and LoRA on tiny tensors and the tiny offline MLLM (model/contrastive.py, model/lora.py)."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
from torch import nn

from model.contrastive import JointTasks, info_nce, joint_loss
from model.lora import LoRALinear, add_lora, merge_lora
from model.mllm import FINETUNE_FILE, FusedEmbedder, embedder_id, load_mllm
from pipelines.config import ConfigError, load_config, plain
from pipelines.synthetic import Item, draw

pytestmark = pytest.mark.fast


def test_info_nce_is_chance_for_equal_scores_and_falls_as_the_positive_wins():
    q = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    same = q[:1].expand(4, -1)  # every candidate alike: every row is a 1-in-4 guess
    assert info_nce(same, same, 0.1).item() == pytest.approx(math.log(4), abs=1e-5)
    assert info_nce(q, q, 0.05) < info_nce(q, q, 1.0)  # positives on the diagonal: sharper is lower


def test_lora_starts_as_the_base_and_merges_to_the_same_function():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.randn(7, 6)
    before = model(x)
    names = add_lora(model, ["0"], rank=2, alpha=4.0)
    assert names == ["0"] and isinstance(model[0], LoRALinear)
    assert torch.allclose(model(x), before)  # B = 0: the update starts at 0
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.lora_a", "0.lora_b"]
    with torch.no_grad():
        model[0].lora_b.normal_()
    adapted = model(x)
    assert not torch.allclose(adapted, before)
    assert merge_lora(model) == 1 and isinstance(model[0], nn.Linear)
    assert torch.allclose(model(x), adapted, atol=1e-5)
    with pytest.raises(ValueError, match=r"no linear layer of the model is named one of \['q_proj'\]"):
        add_lora(model, ["q_proj"], rank=2, alpha=4.0)


def test_joint_loss_has_gradients_for_both_tasks(tiny_models):
    cfg = load_config("conf/demo.yaml", [f"models.embedder.name_or_path={tiny_models['mllm']}"])
    embedder = FusedEmbedder.from_conf(plain(cfg.models.embedder))
    rng = random.Random(0)
    items = [Item("circle", "red", "small", "left", "white"), Item("square", "blue", "large", "right", "black")]
    images = [draw(it, 64, rng) for it in items]
    tasks = JointTasks(temperature=0.1, weight_text_to_image=1.0, weight_target_text=0.5, weight_pair_to_image=0.0)
    loss, parts = joint_loss(embedder, tasks, [it.caption() for it in items], images, images,
                             ["make it a diamond", "change the colour to red"],
                             [it.description() for it in items])
    assert set(parts) == {"loss_text_to_image", "loss_target_text"}
    assert loss.item() == pytest.approx(parts["loss_text_to_image"] + 0.5 * parts["loss_target_text"], rel=1e-5)
    loss.backward()
    grads = [p.grad for p in embedder.mllm.model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    # trainable_vectors are embed's vectors
    with torch.no_grad():
        assert torch.allclose(embedder.trainable_vectors(images=images), embedder.embed(images=images), atol=1e-5)
    with pytest.raises(ValueError, match="every task is empty"):
        joint_loss(embedder, tasks, [], [], [], [], [])


def test_joint_loss_embeds_every_task_in_one_forward_with_the_vectors_of_one_call_each(tiny_models, monkeypatch):
    """joint_loss puts the five groups of rows (images, captions, pairs, composed queries,
    target texts) through the model once, each row with its own side's instruction; the
    losses are those of embedding each group in a call of its own."""
    cfg = load_config("conf/demo.yaml", [f"models.embedder.name_or_path={tiny_models['mllm']}"])
    embedder = FusedEmbedder.from_conf(plain(cfg.models.embedder))
    rng = random.Random(2)
    items = [Item("circle", "red", "small", "left", "white"), Item("square", "blue", "large", "right", "black"),
             Item("star", "green", "large", "centre", "grey")]
    images, captions = [draw(it, 64 + 16 * i, rng) for i, it in enumerate(items)], [it.caption() for it in items]
    edits, targets = ["make it a diamond", "change the colour to red", "move it left"], [it.description() for it in items]
    tasks = JointTasks(temperature=0.1, weight_text_to_image=1.0, weight_target_text=0.5, weight_pair_to_image=2.0)
    forwards = []
    base = embedder.mllm.model.base_model
    monkeypatch.setattr(base, "forward", lambda *a, _f=base.forward, **k: forwards.append(1) or _f(*a, **k))
    loss, parts = joint_loss(embedder, tasks, captions, images, images[::-1], edits, targets)
    assert len(forwards) == 1
    with torch.no_grad():
        e = embedder.embed
        image, caption, pair = e(images=images), e(texts=captions, side="query"), e(images=images, texts=captions)
        query, target = e(images=images[::-1], texts=edits, side="query"), e(texts=targets)
    want = {"loss_text_to_image": info_nce(caption, image, 0.1), "loss_pair_to_image": info_nce(pair, image, 0.1),
            "loss_target_text": info_nce(query, target, 0.1)}
    assert parts == pytest.approx({k: float(v) for k, v in want.items()}, rel=1e-4)
    assert loss.item() == pytest.approx(float(want["loss_text_to_image"] + 2 * want["loss_pair_to_image"]
                                              + 0.5 * want["loss_target_text"]), rel=1e-4)
    # Keys for the captions' images but none for the references: nothing is kept (a
    # reference row would be keyed by its rendered text alone, the same for every image).
    embedder.mllm.__dict__.pop("_kept_rows", None)
    joint_loss(embedder, tasks, captions, images, images[::-1], edits, targets,
               caption_image_keys=["a", "b", "c"])
    assert not embedder.mllm.__dict__.get("_kept_rows")
    joint_loss(embedder, tasks, captions, images, images[::-1], edits, targets,
               caption_image_keys=["a", "b", "c"], reference_keys=["c", "b", "a"])
    assert len(embedder.mllm.__dict__["_kept_rows"]) == 15  # five groups of three rows
    # Per-row sides are checked as one side is.
    with pytest.raises(ValueError, match="embed got 1 sides for 3 items"):
        embedder.trainable_vectors(texts=captions, side=["query"])
    with pytest.raises(ValueError, match="embed side='both'"):
        embedder.trainable_vectors(texts=captions, side=["query", "both", "query"])


def test_a_step_puts_each_distinct_image_through_the_vision_tower_once(tiny_models, monkeypatch):
    """With image keys, an image met twice in a step (a caption's image alone and in its
    pair, a reference that is also a caption's image) goes through the vision tower once;
    the vectors are those of the step without the sharing, and so are the gradients."""
    cfg = load_config("conf/demo.yaml", [f"models.embedder.name_or_path={tiny_models['mllm']}",
                                         "models.embedder.input_cache_rows=0"])
    embedder = FusedEmbedder.from_conf(plain(cfg.models.embedder))
    rng = random.Random(3)
    items = [Item("circle", "red", "small", "left", "white"), Item("square", "blue", "large", "right", "black"),
             Item("star", "green", "large", "centre", "grey")]
    images, captions = [draw(it, 64 + 16 * i, rng) for i, it in enumerate(items)], [it.caption() for it in items]
    tasks = JointTasks(temperature=0.1, weight_text_to_image=1.0, weight_target_text=0.5, weight_pair_to_image=2.0)
    args = (embedder, tasks, captions, images, images[1:2], ["make it a diamond"], [items[1].description()])
    base = embedder.mllm.model.base_model
    towers = []
    monkeypatch.setattr(base, "get_image_features",
                        lambda pixels, grid, _f=base.get_image_features, **k: towers.append(len(grid))
                        or _f(pixels, grid, **k))

    def step(**keys) -> tuple[torch.Tensor, torch.Tensor]:
        embedder.mllm.model.zero_grad()
        loss, _ = joint_loss(*args, **keys)
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in embedder.mllm.model.parameters()
                                         if p.grad is not None])

    plain_loss, plain_grad = step()
    assert towers == [7]  # 3 images, 3 pairs, 1 reference
    shared_loss, shared_grad = step(caption_image_keys=["a", "b", "c"], reference_keys=["b"])
    assert towers[1:] == [3]
    assert shared_loss.item() == pytest.approx(plain_loss.item(), rel=1e-6)
    assert torch.allclose(shared_grad, plain_grad, rtol=1e-4, atol=1e-6)


def test_the_pair_task_pulls_a_fused_pair_to_its_own_image(tiny_models):
    """weight_pair_to_image: f_M(I, caption) (candidate side, as `embed` writes Stage 1's
    targets) retrieves f_M(I) among the batch's images; a few steps of that task alone
    lower its loss and widen the margin of each pair's cosine to its own image over the
    others."""
    cfg = load_config("conf/demo.yaml", [f"models.embedder.name_or_path={tiny_models['mllm']}"])
    embedder = FusedEmbedder.from_conf(plain(cfg.models.embedder))
    rng = random.Random(1)
    items = [Item(s, c, "large", p, b) for s, c, p, b in
             [("circle", "red", "left", "white"), ("square", "blue", "right", "black"),
              ("star", "green", "centre", "grey"), ("cross", "yellow", "left", "navy")]]
    images, captions = [draw(it, 64, rng) for it in items], [it.caption() for it in items]
    tasks = JointTasks(temperature=0.1, weight_text_to_image=0.0, weight_target_text=0.0, weight_pair_to_image=1.0)

    def margin_and_hits() -> tuple[float, int]:
        with torch.no_grad():
            sims = embedder.embed(images=images, texts=captions) @ embedder.embed(images=images).T
        own = sims.diag()
        others = (sims.sum(1) - own) / (len(items) - 1)
        return float((own - others).mean()), int((sims.argmax(1) == torch.arange(len(items))).sum())

    params = [p for p in embedder.mllm.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    margin_before, _ = margin_and_hits()  # the random tiny model: 0.08
    losses = []
    for _ in range(6):
        loss, parts = joint_loss(embedder, tasks, captions, images, [], [], [])
        assert set(parts) == {"loss_pair_to_image"}
        assert loss.item() == pytest.approx(parts["loss_pair_to_image"], rel=1e-5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    margin, hits = margin_and_hits()
    assert margin > margin_before + 0.3 and hits == len(items), (margin_before, margin, hits)  # 0.93 seen


def test_at_least_one_finetuning_task_is_weighted():
    off = ["finetune_embedder.weight_text_to_image=0", "finetune_embedder.weight_target_text=0"]
    assert load_config("conf/demo.yaml", [*off, "finetune_embedder.weight_pair_to_image=1"])
    with pytest.raises(ConfigError, match="one task at least"):
        load_config("conf/demo.yaml", [*off, "finetune_embedder.weight_pair_to_image=0"])


def test_a_new_finetuning_run_at_the_same_path_changes_the_embedder_id(tmp_path, tiny_models):
    conf = plain(load_config("conf/demo.yaml", [f"models.embedder.name_or_path={tmp_path}"]).models.embedder)
    plain_id = embedder_id(conf)
    (tmp_path / FINETUNE_FILE).write_text(json.dumps({"run": "a", "step": 10}))
    first = embedder_id(conf)
    (tmp_path / FINETUNE_FILE).write_text(json.dumps({"run": "a", "step": 20}))
    assert len({plain_id, first, embedder_id(conf)}) == 3
