"""Does the Stage 1 prior use its text condition on a lake's embedding space? Trains the
prior of conf `prior` in this process on the lake's pair vectors and their texts
(batches of 128, conf train_stage1's optimiser), and every quarter of the steps samples
it from the TRUE target descriptions of the catalogue's queries and ranks the lake's
image vectors: prior_only with a perfect describer. The oracle line ranks by each
target's own pair vector (what a perfect prior would give).

    .venv/bin/python bench/prior_conditioning.py RUN_DIR STEPS [key=value ...]

RUN_DIR: a demo run folder (runs/demo after `make demo`): lake/embeddings.lance,
catalogue/manifest.parquet and queries.parquet.
"""
from __future__ import annotations

import sys
import time

import lance
import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from model.diffusion import DiffusionConfig, GuidedSampler, SamplerConfig, ddpm_scheduler, diffusion_loss
from model.prior import FusionDiffPrior
from model.text_encoder import load_text_encoder_from_conf
from model.training import OptimConfig, apply_step, make_optimizer, make_scheduler
from pipelines.config import load_config, plain
from pipelines.synthetic import ATTRIBUTES, Item

BATCH = 128


def ranks(vectors: torch.Tensor, gallery: torch.Tensor, targets: torch.Tensor) -> str:
    s = F.normalize(vectors, dim=-1) @ gallery.T
    rank = (s > s[torch.arange(len(targets)), targets][:, None]).sum(1)
    return (f"R@1 {100 * (rank < 1).float().mean():.1f} R@10 {100 * (rank < 10).float().mean():.1f} "
            f"median rank {int(rank.median()) + 1} of {len(gallery)}")


def main(run_dir: str, steps: int, overrides: list[str]) -> None:
    cfg = load_config("conf/demo.yaml", [f"run_dir={run_dir}", *overrides])
    rows = lance.dataset(f"{cfg.storage.root}/embeddings.lance").to_table(
        columns=["image_id", "kind", "vector", "text"]).to_pylist()
    image = {r["image_id"]: r["vector"] for r in rows if r["kind"] == "image"}
    pairs = {r["image_id"]: (r["vector"], r["text"]) for r in rows if r["kind"] == "pair"}
    ids = sorted(image)
    gallery = torch.tensor(np.asarray([image[i] for i in ids], np.float32))
    manifest = {r["image_id"]: r for r in pq.read_table(cfg.catalogue.manifest).to_pylist()}
    queries = pq.read_table(cfg.catalogue.queries).to_pylist()
    targets = torch.tensor([ids.index(q["target_id"]) for q in queries])
    truth = [Item(**{a: manifest[q["target_id"]][a] for a in ATTRIBUTES}).description() for q in queries]
    own = torch.tensor(np.asarray([pairs[q["target_id"]][0] for q in queries], np.float32))
    print(f"oracle (the target's own pair vector): {ranks(own, gallery, targets)}", flush=True)

    encoder = load_text_encoder_from_conf(plain(cfg.models.text_encoder), plain(cfg.models.embedder))
    z = torch.tensor(np.asarray([v for v, _ in pairs.values()], np.float32))
    c, m = (t.clone() for t in encoder.encode([t for _, t in pairs.values()]))
    cq, mq = encoder.encode(truth)
    diffusion, sampling = DiffusionConfig(**plain(cfg.diffusion)), SamplerConfig(**plain(cfg.sampling))
    torch.manual_seed(cfg.seed)
    prior = FusionDiffPrior(d_vl=z.shape[1], cond_dim=c.shape[-1], **plain(cfg.prior))
    optim = OptimConfig.from_conf(plain(cfg.train_stage1))
    params = list(prior.parameters())
    opt = make_optimizer(params, optim)
    sched = make_scheduler(opt, optim, steps)
    noise, g, t0 = ddpm_scheduler(diffusion), torch.Generator().manual_seed(cfg.seed), time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(z), (BATCH,), generator=g)
        diffusion_loss(prior, diffusion, z[idx], c[idx], m[idx], generator=g, scheduler=noise).backward()
        apply_step(opt, sched, params, optim.grad_clip)
        if step % max(1, steps // 4) == 0 or step == steps:
            prior.eval()
            gens = [torch.Generator().manual_seed(i) for i in range(len(queries))]
            with torch.no_grad():
                sampled = GuidedSampler(diffusion, sampling).sample(prior, cq, mq, generator=gens).float()
            print(f"step {step} ({time.time() - t0:.0f}s): prior_only from the true descriptions: "
                  f"{ranks(sampled, gallery, targets)}", flush=True)
            prior.train()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
