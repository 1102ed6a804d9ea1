"""MVFT-JI's joint fine-tuning of the fused embedder f_M: two in-batch contrastive tasks.

MVFT-JI (seeds/mvft-ji.txt) synthesises two retrieval tasks with an MLLM from
unlabeled images and fine-tunes the embedder on both at once:

- text-to-image: an image's MLLM caption (query side) retrieves the image (candidate
  side) among the batch's images;
- target text: a composed query (reference image + modification text, query side)
  retrieves the target's text (candidate side) among the batch's target texts.

Each is InfoNCE over the batch in the retrieval direction (the other rows of the batch
are the negatives); the loss is their weighted sum.

A third task, off in MVFT-JI's recipe (weight 0), keeps what Fusion-Diff needs of the
joint space: a fused pair f_M(I, T) (candidate side, as `embed` writes Stage 1's
targets) retrieves its own image f_M(I) among the batch's images. The prior samples in
the pairs' space and the gallery holds images alone, so a pair must stay where its
image is; MVFT-JI's two tasks never meet a pair, and on the demo's world 18 epochs of
them moved pairs away (a target's pair found its image at R@10 0.975 before, 0.45
after: docs/benchmarks.md). The `finetune_embedder` stage runs
this on Ray Train; the world model's training can run it too.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from model.mllm import FusedEmbedder


@dataclass(frozen=True)
class JointTasks:
    """conf `finetune_embedder` (documented in conf/base.yaml): the loss's knobs."""

    temperature: float
    weight_text_to_image: float
    weight_target_text: float
    weight_pair_to_image: float

    @classmethod
    def from_conf(cls, section: dict) -> "JointTasks":
        return cls(**{f.name: section[f.name] for f in fields(cls)})


def info_nce(queries: torch.Tensor, candidates: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean cross-entropy of each query against every candidate, its own (same row) the
    positive; both (B, d) unit vectors."""
    logits = queries @ candidates.t() / temperature
    return F.cross_entropy(logits, torch.arange(len(queries), device=logits.device))


def joint_loss(
    embedder: FusedEmbedder,
    tasks: JointTasks,
    caption_texts: Sequence[str],
    caption_images: Sequence[Image.Image],
    references: Sequence[Image.Image],
    modifications: Sequence[str],
    target_texts: Sequence[str],
    caption_image_keys: Sequence | None = None,
    reference_keys: Sequence | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted sum of the tasks' losses (the caption rows serve text-to-image and
    pair-to-image), and each task's loss (detached) for the metrics log. A task with no
    rows contributes nothing.
    caption_image_keys, reference_keys: what each image is (its bytes' sha256); given,
    the embedder keeps each row's processed inputs for the next epochs
    (models.embedder.input_cache_rows)."""
    n_captions, n_references = len(caption_texts), len(references)
    image_keys = list(caption_image_keys or [None] * n_captions)
    text_keys = [None] * n_captions  # a text-only row: its text is its key
    # Every task's rows as (images, texts, side, keys) groups, embedded in one forward of
    # the model (the rows are independent): on the demo's tiny embedder a step takes 71
    # ms so, against 101 in a forward per group (bench/finetune_step.py).
    groups: dict[str, tuple] = {}
    if caption_texts and (tasks.weight_text_to_image > 0 or tasks.weight_pair_to_image > 0):
        # The images are the candidates of both caption tasks: embedded once.
        groups["images"] = (list(caption_images), [None] * n_captions, "candidate", image_keys)
        if tasks.weight_text_to_image > 0:
            groups["captions"] = ([None] * n_captions, list(caption_texts), "query", text_keys)
        if tasks.weight_pair_to_image > 0:
            groups["pairs"] = (list(caption_images), list(caption_texts), "candidate", image_keys)
    if references and tasks.weight_target_text > 0:
        groups["queries"] = (list(references), list(modifications), "query",
                             list(reference_keys or [None] * n_references))
        groups["targets"] = ([None] * n_references, list(target_texts), "candidate", [None] * n_references)
    if not groups:
        raise ValueError("joint_loss: every task is empty or weighted 0: nothing to train")
    images, texts, keys = ([row for g in groups.values() for row in g[i]] for i in (0, 1, 3))
    sides = [side for g in groups.values() for side in [g[2]] * len(g[0])]
    # Rows are kept only when every row with an image names it: a text-only row's text is
    # its key, an image row without one would share its rendered text with other images.
    keep = any(k is not None for k in keys) and all(
        k is not None for k, im in zip(keys, images) if im is not None)
    vectors = embedder.trainable_vectors(images=images, texts=texts, side=sides,
                                         image_keys=keys if keep else None)
    v = dict(zip(groups, vectors.split([len(g[0]) for g in groups.values()])))

    parts, weighted = {}, []

    def add(task: str, weight: float, queries: torch.Tensor, candidates: torch.Tensor) -> None:
        loss = info_nce(queries, candidates, tasks.temperature)
        parts[f"loss_{task}"] = float(loss.detach())
        weighted.append(weight * loss)

    if "captions" in v:
        add("text_to_image", tasks.weight_text_to_image, v["captions"], v["images"])
    if "pairs" in v:
        add("pair_to_image", tasks.weight_pair_to_image, v["pairs"], v["images"])
    if "queries" in v:
        add("target_text", tasks.weight_target_text, v["queries"], v["targets"])
    return sum(weighted[1:], weighted[0]), parts
