"""The paper's Table 3 in miniature: query_only vs prior_only vs full, on a synthetic joint space.

The space: each of `num_attributes` attributes has `values_per_attribute` values, each
value a random direction in R^d; an item's vector is the normalised sum of its values'
directions plus a little noise. The gallery is every combination.

- Stage 1 pairs: (item vector, caption) where the caption names each attribute with
  probability `caption_mention`. Text is a bag of attribute-value tokens embedded by a
  fixed random table (the text encoder of this world), padded with a mask.
- An edit changes one attribute of a reference to a new value. The query vector
  z_{r,Delta} = normalise(reference + edit_weight * new value's direction + noise):
  near the target, but as near to the reference's other neighbours, so ranking by it
  alone (A, query_only) is imperfect.
- The target description T~ names the new value and each other attribute with
  probability `description_mention`: alone (B, prior_only) it leaves the unnamed
  attributes open.
- The full model (C) has both. Stage 2 trains the Control-Adapter on triplets whose
  targets avoid a held-out share of the gallery; evaluation queries target only those.

Prints progress, then as its last line one JSON object:
{"query_only": {"R@1": ..., "R@5": ..., "R@10": ...}, "prior_only": {...}, "full": {...}}

    .venv/bin/python bench/ablation_synthetic.py [key=value ...]
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.checkpoints import load_prior
from model.diffusion import DiffusionConfig, GuidedSampler, SamplerConfig, ddpm_scheduler, diffusion_loss
from model.prior import ControlAdapter, FusionDiffPrior
from model.training import OptimConfig, accumulate_gradients, apply_step, make_optimizer, make_scheduler
from pipelines.config import BASE, BENCH_SCHEMA, load_config

CONFIGS = ["conf/demo.yaml", "conf/bench/ablation.yaml"]
COND_DIM = 32


@dataclass
class World:
    attrs: torch.Tensor  # (K, V, d): each value's direction
    token_table: torch.Tensor  # (K * V, COND_DIM): the text encoder of this world
    items: torch.Tensor  # (N, K) value index of every attribute
    gallery: torch.Tensor  # (N, d) unit vectors
    held_out: torch.Tensor  # (N,) bool
    cfg: dict

    @classmethod
    def build(cls, cfg: dict, d: int, g: torch.Generator) -> "World":
        k, v = cfg["num_attributes"], cfg["values_per_attribute"]
        attrs = F.normalize(torch.randn(k, v, d, generator=g), dim=-1)
        items = torch.cartesian_prod(*[torch.arange(v)] * k)
        vectors = attrs[torch.arange(k), items].sum(1) + cfg["item_noise"] * torch.randn(len(items), d, generator=g) / d ** 0.5
        held = torch.rand(len(items), generator=g) < cfg["held_out"]
        return cls(attrs, torch.randn(k * v, COND_DIM, generator=g), items, F.normalize(vectors, dim=-1), held, cfg)

    def index(self, values: torch.Tensor) -> torch.Tensor:
        v = self.cfg["values_per_attribute"]
        weights = v ** torch.arange(values.shape[1] - 1, -1, -1)
        return (values * weights).sum(1)

    def text(self, values: torch.Tensor, mention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens of the mentioned attribute values, (B, K, COND_DIM), and their mask."""
        k, v = values.shape[1], self.cfg["values_per_attribute"]
        tokens = self.token_table[torch.arange(k) * v + values]
        return tokens * mention.unsqueeze(-1), mention

    def pairs(self, n: int, g: torch.Generator):
        idx = torch.randint(0, len(self.items), (n,), generator=g)
        mention = torch.rand(n, self.items.shape[1], generator=g) < self.cfg["caption_mention"]
        mention[torch.arange(n), torch.randint(0, self.items.shape[1], (n,), generator=g)] = True
        return self.gallery[idx], *self.text(self.items[idx], mention)

    def queries(self, n: int, g: torch.Generator, held_out: bool):
        """(z_q, description tokens, mask, target index, reference index) of n edits."""
        k, v = self.items.shape[1], self.cfg["values_per_attribute"]
        out = []
        while sum(len(o[0]) for o in out) < n:
            ref = torch.randint(0, len(self.items), (4 * n,), generator=g)
            attr = torch.randint(0, k, (4 * n,), generator=g)
            shift = torch.randint(1, v, (4 * n,), generator=g)
            tgt_vals = self.items[ref].clone()
            tgt_vals[torch.arange(4 * n), attr] = (tgt_vals[torch.arange(4 * n), attr] + shift) % v
            tgt = self.index(tgt_vals)
            keep = self.held_out[tgt] == held_out
            out.append((ref[keep], attr[keep], tgt_vals[keep], tgt[keep]))
        ref, attr, tgt_vals, tgt = (torch.cat(x)[:n] for x in zip(*out))
        d = self.gallery.shape[1]
        new_dir = self.attrs[attr, tgt_vals[torch.arange(n), attr]]
        noise = torch.randn(n, d, generator=g) / d ** 0.5
        zq = F.normalize(self.gallery[ref] + self.cfg["edit_weight"] * new_dir + self.cfg["query_noise"] * noise, dim=-1)
        mention = torch.rand(n, k, generator=g) < self.cfg["description_mention"]
        mention[torch.arange(n), attr] = True
        return zq, *self.text(tgt_vals, mention), tgt, ref


def recall(query: torch.Tensor, world: World, target: torch.Tensor, reference: torch.Tensor) -> dict:
    """Recall@1/5/10 in percent, the reference removed from its own ranking (CIRR's protocol)."""
    scores = F.normalize(query, dim=-1) @ world.gallery.T
    scores[torch.arange(len(reference)), reference] = -2
    rank = (scores > scores[torch.arange(len(target)), target].unsqueeze(1)).sum(1)
    return {f"R@{k}": round(100 * (rank < k).float().mean().item(), 2) for k in (1, 5, 10)}


def train(prior, adapter, world, diffusion, optim: OptimConfig, steps: int, batch: int, g, stage: str, log):
    params = [p for p in (adapter or prior).parameters() if p.requires_grad]
    opt = make_optimizer(params, optim)
    sched = make_scheduler(opt, optim, steps)
    noise_sched = ddpm_scheduler(diffusion)
    t0 = time.time()
    for step in range(steps):
        # The worker's step (pipelines/train.py): accumulate_gradients, then apply_step.
        if adapter is None:
            z0, c, m = world.pairs(batch, g)
            loss = accumulate_gradients(lambda rows: diffusion_loss(
                prior, diffusion, z0, c, m, generator=g, scheduler=noise_sched), batch, 0)
        else:
            zq, c, m, tgt, _ = world.queries(batch, g, held_out=False)
            loss = accumulate_gradients(lambda rows: diffusion_loss(
                prior, diffusion, world.gallery[tgt], c, m, adapter=adapter, z_query=zq, generator=g,
                scheduler=noise_sched), batch, 0)
        apply_step(opt, sched, params, optim.grad_clip)
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            log(f"[{stage}] step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")


def run_ablation(cfg, log=print) -> dict:
    from pipelines.config import plain

    a = plain(cfg.ablation)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    d = cfg.models.embedder.dim
    world = World.build(a, d, g)
    diffusion = DiffusionConfig(**plain(cfg.diffusion))
    sampling = SamplerConfig(**plain(cfg.sampling))
    prior = FusionDiffPrior(d_vl=d, cond_dim=COND_DIM, **plain(cfg.prior))
    log(f"[ablation] {len(world.items)} gallery items, d={d}, prior {sum(p.numel() for p in prior.parameters()):,} parameters")
    cached = f"{cfg.run_dir}/stage1_prior"
    if a["reuse_stage1"] and os.path.exists(f"{cached}/config.json"):
        # Same config, same seed: the same Stage 1 prior, so Stage 2 experiments skip it.
        prior = load_prior(cached, expected={k: v for k, v in dict(prior.config).items() if not k.startswith("_")})
        log(f"[stage1] reused {cached}")
    else:
        train(prior, None, world, diffusion, OptimConfig.from_conf(plain(cfg.train_stage1)), a["stage1_steps"], a["batch_size"], g, "stage1", log)
        prior.save_pretrained(cached)
    prior.eval().requires_grad_(False)
    adapter = ControlAdapter.from_prior(prior)
    g = torch.Generator().manual_seed(cfg.seed + 2)  # Stage 2 draws the same whether Stage 1 ran or was reused
    train(prior, adapter, world, diffusion, OptimConfig.from_conf(plain(cfg.train_stage2)), a["stage2_steps"], a["batch_size"], g, "stage2", log)
    adapter.eval()
    return evaluate(world, prior, adapter, diffusion, sampling, a["num_queries"], cfg.seed + 1)


def evaluate(world, prior, adapter, diffusion, sampling, num_queries: int, seed: int) -> dict:
    eval_g = torch.Generator().manual_seed(seed)
    zq, c, m, tgt, ref = world.queries(num_queries, eval_g, held_out=True)
    sampler = GuidedSampler(diffusion, sampling)
    results = {
        "query_only": recall(zq, world, tgt, ref),
        "prior_only": recall(sampler.sample(prior, c, m, generator=eval_g), world, tgt, ref),
        "full": recall(sampler.sample(prior, c, m, adapter, zq, generator=eval_g), world, tgt, ref),
    }
    return results


def main(argv: list[str]) -> None:
    cfg = load_config(CONFIGS, argv, schemas=(BASE, BENCH_SCHEMA))
    t = time.time()
    results = run_ablation(cfg)
    print(f"[ablation] done in {time.time() - t:.0f}s")
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
