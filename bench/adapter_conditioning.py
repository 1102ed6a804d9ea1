"""Does Stage 2's Control-Adapter use z_{r,Delta}? Trains an adapter on a lake's frozen
Stage 1 prior in this process (conf train_stage2's optimiser, batches of
train_stage2.batch_size drawn from `triplet_embeddings`), and every quarter of the steps
samples `full` for the held-out queries of the demo's benchmark from the describer's T~
the last rank run wrote (`query_vectors`, mode full) and the composed query vectors
z_{r,Delta} (mode query_only), and ranks the lake's gallery (the reference is not left
out, as CIRR's metrics do: figures a query or two off the benchmark's). Printed first:
the oracle (each target's own fused pair vector: the best full and prior_only can do in
this space), `query_only` (z_{r,Delta} itself) and `prior_only` (the same T~, no adapter).

    .venv/bin/python bench/adapter_conditioning.py RUN_DIR STEPS [--stage1 STEPS1] [--validate N] [--every K] [--true-descriptions]
        [key=value ...]

--stage1 STEPS1: the prior trained here first (STEPS1 steps of batches drawn at random
from the lake's pair vectors) instead of the lake's exported Stage 1 prior.
--validate N: about N triplets are held out of the adapter's training, all those of a
seeded draw of target items (none of them a target the adapter trains on, as the
benchmark's targets are new to it), and at each evaluation their `full` samples (their
own condition text and z_query) rank the distinct targets of all the triplets (one
vector per target description): how long Stage 2 may train before it learns its
triplets rather than edits, read off the training world, never off the benchmark.
--every K: evaluate every K adapter steps (default: every quarter of STEPS).
--true-descriptions: the benchmark's queries are sampled from their targets' true
descriptions (the synthetic manifest's attributes) instead of the describer's T~.

RUN_DIR: a demo run folder after `make demo` (its lake holds the prior, the triplets'
vectors and the benchmark's query vectors). The overrides are conf/demo.yaml's
(train_stage2.*, diffusion.*, sampling.*); the adapter trains on the condition text
the lake's triplets stage wrote (train_stage2.condition_text when it ran).
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
from pipelines.config import load_config, plain
from pipelines.synthetic import ATTRIBUTES, Item

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


def main(run_dir: str, steps: int, stage1_steps: int, validate: int, every: int, true_descriptions: bool,
         overrides: list[str]) -> None:
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
    if true_descriptions:
        # Each target's own description, as the world writes it (the describer's T~ names a
        # wrong shape or position for some): what a perfect describer would condition on.
        items = {r["image_id"]: r for r in pq.read_table(f"{cfg.synthetic.out_dir}/manifest.parquet").to_pylist()}
        desc = [Item(**{k: items[queries[q]["target_id"]][k] for k in ATTRIBUTES}).description() for q in qids]

    # The condition the triplets stage wrote (train_stage2.condition_text when it ran).
    col = "cond_text"
    trip = lance.dataset(f"{root}/triplet_embeddings.lance").to_table(
        columns=["triplet_id", "z_query", "z_target", "target_description", col]).to_pylist()
    trip.sort(key=lambda r: r["triplet_id"])
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

    def draw(cond, mask, adapter=None, z_query=None) -> torch.Tensor:
        """One sample per row, its noise seeded from its position."""
        gens = [torch.Generator().manual_seed(seed + i) for i in range(len(cond))]
        with torch.no_grad():
            return GuidedSampler(diffusion, sampling).sample(prior, cond, mask, adapter, z_query, generator=gens)

    def sample(adapter=None) -> torch.Tensor:
        return draw(cq, mq, adapter, zq if adapter is not None else None)

    print(f"{len(qids)} queries, gallery {len(ids)}, {len(trip)} triplets, condition {col}", flush=True)
    # What a prior that drew each target's own fused pair exactly would reach: the ceiling
    # of full and prior_only in this lake's space (finetune_embedder.weight_pair_to_image).
    own = torch.tensor(np.asarray([pair[queries[q]["target_id"]] for q in qids], np.float32))
    print(f"oracle (the target's own pair vector): {ranks(own, gallery, targets)}", flush=True)
    print(f"query_only: {ranks(zq, gallery, targets)}", flush=True)
    print(f"prior_only: {ranks(sample(), gallery, targets)}", flush=True)
    # The held-out triplets: every triplet of a seeded draw of targets until N are held
    # (a target item recurs in the triplets, and the benchmark's targets are new to Stage 2).
    by_target: dict[str, list[int]] = {}
    for n, r in enumerate(trip):
        by_target.setdefault(r["target_description"], []).append(n)
    distinct = list(by_target)
    val, held = [], set()
    for k in torch.randperm(len(distinct), generator=torch.Generator().manual_seed(seed)).tolist():
        if len(val) >= validate:
            break
        held.add(k)
        val += by_target[distinct[k]]
    val = torch.tensor(sorted(val), dtype=torch.long)
    train = torch.tensor(sorted(n for k, d in enumerate(distinct) if k not in held for n in by_target[d]))
    v_gallery = F.normalize(t_z0[[by_target[d][0] for d in distinct]], dim=-1)
    target_of = {n: k for k, d in enumerate(distinct) for n in by_target[d]}
    v_targets = torch.tensor([target_of[int(n)] for n in val])

    def validation(adapter) -> str:
        z = draw(c[val], m[val], adapter, t_zq[val])
        return f"; validation ({len(val)} held-out triplets) {ranks(z, v_gallery, v_targets)}"

    adapter = ControlAdapter.from_prior(prior)
    sc = plain(cfg.train_stage2)
    optim = OptimConfig.from_conf(sc)
    params = [p for p in adapter.parameters() if p.requires_grad]
    opt, noise = make_optimizer(params, optim), ddpm_scheduler(diffusion)
    sched = make_scheduler(opt, optim, steps)
    g, t0 = torch.Generator().manual_seed(seed), time.time()
    for step in range(1, steps + 1):
        idx = train[torch.randint(0, len(train), (sc["batch_size"],), generator=g)]
        loss = diffusion_loss(prior, diffusion, t_z0[idx], c[idx], m[idx], adapter=adapter, z_query=t_zq[idx],
                              generator=g, scheduler=noise)
        loss.backward()
        apply_step(opt, sched, params, optim.grad_clip)
        if step % (every or max(1, steps // 4)) == 0 or step == steps:
            adapter.eval()
            print(f"step {step} ({time.time() - t0:.0f}s) loss {loss.item():.4f}: full "
                  f"{ranks(sample(adapter), gallery, targets)}{validation(adapter) if validate else ''}",
                  flush=True)
            adapter.train()


if __name__ == "__main__":
    args = sys.argv[1:]
    flags = {"--stage1": 0, "--validate": 0, "--every": 0}
    for flag in flags:
        if flag in args:
            i = args.index(flag)
            flags[flag] = int(args[i + 1])
            del args[i : i + 2]
    true_descriptions = "--true-descriptions" in args
    args = [a for a in args if a != "--true-descriptions"]
    main(args[0], int(args[1]), flags["--stage1"], flags["--validate"], flags["--every"], true_descriptions,
         args[2:])
