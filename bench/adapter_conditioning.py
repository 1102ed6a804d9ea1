"""Does Stage 2's Control-Adapter use z_{r,Delta}? Trains an adapter on a lake's frozen
Stage 1 prior in this process (conf train_stage2's optimiser, batches of
train_stage2.batch_size drawn from `triplet_embeddings`), and every quarter of the steps
samples `full` for the held-out queries of the demo's benchmark from the describer's T~
the last rank run wrote (`query_vectors`, mode full) and the composed query vectors
z_{r,Delta} (mode query_only), and ranks the lake's gallery (the reference is not left
out, as CIRR's metrics do: figures a query or two off the benchmark's). Printed first:
the oracle (each target's own fused pair vector: the best full and prior_only can do in
this space), `query_only` (z_{r,Delta} itself) and `prior_only` (the same T~, no adapter).

    .venv/bin/python bench/adapter_conditioning.py RUN_DIR STEPS [--stage1 STEPS1] [key=value ...]

--stage1 STEPS1: the prior trained here first (STEPS1 steps of batches drawn at random
from the lake's pair vectors) instead of the lake's exported Stage 1 prior.

RUN_DIR: a demo run folder after `make demo` (its lake holds the prior, the triplets'
vectors and the benchmark's query vectors). The overrides are conf/demo.yaml's
(train_stage2.*, diffusion.*, sampling.*); `train_stage2.condition_text=description`
or `instruction` picks the training condition as the stage does.
"""
from __future__ import annotations

import os
import sys
import time

import lance
import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from model.checkpoints import load_prior
from model.diffusion import DiffusionConfig, GuidedSampler, SamplerConfig, ddpm_scheduler, diffusion_loss
from model.prior import ControlAdapter, FusionDiffPrior
from model.text_encoder import load_text_encoder_from_conf
from model.training import OptimConfig, apply_step, make_optimizer, make_scheduler
from ops.triplets import CONDITION_TEXTS
from pipelines.config import load_config, plain

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.prior_conditioning import ranks  # noqa: E402


def train_prior(cfg, root: str, encoder, diffusion: DiffusionConfig, steps: int) -> FusionDiffPrior:
    """A Stage 1 prior trained here on the lake's pair vectors, batches drawn at random."""
    rows = lance.dataset(f"{root}/embeddings.lance").to_table(
        columns=["vector", "text"], filter="kind = 'pair'").to_pylist()
    z = torch.tensor(np.asarray([r["vector"] for r in rows], np.float32))
    c, m = (t.clone() for t in encoder.encode([r["text"] for r in rows]))
    torch.manual_seed(cfg.seed)
    prior = FusionDiffPrior(d_vl=z.shape[1], cond_dim=c.shape[-1], **plain(cfg.prior))
    sc = plain(cfg.train_stage1)
    optim = OptimConfig.from_conf(sc)
    params = list(prior.parameters())
    opt, noise = make_optimizer(params, optim), ddpm_scheduler(diffusion)
    sched = make_scheduler(opt, optim, steps)
    g, t0 = torch.Generator().manual_seed(cfg.seed), time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(z), (sc["batch_size"],), generator=g)
        loss = diffusion_loss(prior, diffusion, z[idx], c[idx], m[idx], generator=g, scheduler=noise)
        loss.backward()
        apply_step(opt, sched, params, optim.grad_clip)
    print(f"stage 1: {steps} steps here, loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    return prior


def main(run_dir: str, steps: int, stage1_steps: int, overrides: list[str]) -> None:
    cfg = load_config(["conf/demo.yaml", "conf/eval/demo_cirr.yaml"], [f"run_dir={run_dir}", *overrides])
    root, seed = cfg.storage.root, cfg.seed
    torch.manual_seed(seed)
    emb = lance.dataset(f"{root}/embeddings.lance").to_table(
        columns=["image_id", "kind", "vector"]).to_pylist()
    vec = {r["image_id"]: r["vector"] for r in emb if r["kind"] == "image"}
    pair = {r["image_id"]: r["vector"] for r in emb if r["kind"] == "pair"}
    ids = sorted(vec)
    gallery = F.normalize(torch.tensor(np.asarray([vec[i] for i in ids], np.float32)), dim=-1)
    # The benchmark's queries as `benchmark` wrote them (their ids are its, not the catalogue's).
    queries = {q["query_id"]: q for q in pq.read_table(f"{cfg.eval.out_dir}/queries.parquet").to_pylist()}
    qv = lance.dataset(f"{root}/query_vectors.lance").to_table(
        columns=["query_id", "mode", "description", "vector"]).to_pylist()
    full = {r["query_id"]: r["description"] for r in qv if r["mode"] == "full" and r["query_id"] in queries}
    zq_of = {r["query_id"]: r["vector"] for r in qv if r["mode"] == "query_only" and r["query_id"] in queries}
    qids = sorted(set(full) & set(zq_of))
    if not qids:
        raise SystemExit(f"{root}/query_vectors.lance holds no query with both a full and a query_only row")
    targets = torch.tensor([ids.index(queries[q]["target_id"]) for q in qids])
    zq = torch.tensor(np.asarray([zq_of[q] for q in qids], np.float32))
    desc = [full[q] for q in qids]

    trip = lance.dataset(f"{root}/triplet_embeddings.lance").to_table(
        columns=["z_query", "z_target", CONDITION_TEXTS[cfg.train_stage2.condition_text]]).to_pylist()
    col = CONDITION_TEXTS[cfg.train_stage2.condition_text]
    t_zq = torch.tensor(np.asarray([r["z_query"] for r in trip], np.float32))
    t_z0 = torch.tensor(np.asarray([r["z_target"] for r in trip], np.float32))
    encoder = load_text_encoder_from_conf(plain(cfg.models.text_encoder), plain(cfg.models.embedder))
    c, m = (t.clone() for t in encoder.encode([r[col] for r in trip]))
    cq, mq = (t.clone() for t in encoder.encode(desc))

    diffusion, sampling = DiffusionConfig(**plain(cfg.diffusion)), SamplerConfig(**plain(cfg.sampling))
    if stage1_steps:
        prior = train_prior(cfg, root, encoder, diffusion, stage1_steps)
    else:
        prior = load_prior(cfg.train_stage1.output)
    prior.requires_grad_(False).eval()

    def sample(adapter=None) -> torch.Tensor:
        gens = [torch.Generator().manual_seed(seed + i) for i in range(len(qids))]
        with torch.no_grad():
            return GuidedSampler(diffusion, sampling).sample(
                prior, cq, mq, adapter, zq if adapter is not None else None, generator=gens)

    print(f"{len(qids)} queries, gallery {len(ids)}, {len(trip)} triplets, condition {col}", flush=True)
    # What a prior that drew each target's own fused pair exactly would reach: the ceiling
    # of full and prior_only in this lake's space (finetune_embedder.weight_pair_to_image).
    own = torch.tensor(np.asarray([pair[queries[q]["target_id"]] for q in qids], np.float32))
    print(f"oracle (the target's own pair vector): {ranks(own, gallery, targets)}", flush=True)
    print(f"query_only: {ranks(zq, gallery, targets)}", flush=True)
    print(f"prior_only: {ranks(sample(), gallery, targets)}", flush=True)
    adapter = ControlAdapter.from_prior(prior)
    sc = plain(cfg.train_stage2)
    optim = OptimConfig.from_conf(sc)
    params = [p for p in adapter.parameters() if p.requires_grad]
    opt, noise = make_optimizer(params, optim), ddpm_scheduler(diffusion)
    sched = make_scheduler(opt, optim, steps)
    g, t0 = torch.Generator().manual_seed(seed), time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(trip), (sc["batch_size"],), generator=g)
        loss = diffusion_loss(prior, diffusion, t_z0[idx], c[idx], m[idx], adapter=adapter, z_query=t_zq[idx],
                              generator=g, scheduler=noise)
        loss.backward()
        apply_step(opt, sched, params, optim.grad_clip)
        if step % max(1, steps // 4) == 0 or step == steps:
            adapter.eval()
            print(f"step {step} ({time.time() - t0:.0f}s) loss {loss.item():.4f}: full "
                  f"{ranks(sample(adapter), gallery, targets)}", flush=True)
            adapter.train()


if __name__ == "__main__":
    args = sys.argv[1:]
    stage1 = 0
    if "--stage1" in args:
        i = args.index("--stage1")
        stage1 = int(args[i + 1])
        del args[i : i + 2]
    main(args[0], int(args[1]), stage1, args[2:])
