"""The synthetic catalogue of the demo and the tests, deterministic from a seed.

Images are drawn procedurally from known attributes, so every caption, edit and target
is known exactly. Written under `synthetic.out_dir` (local or s3://):
- `images/<image_id>.png` and `manifest.parquet` (image_id, uri, caption, attributes),
- `triplets/` images and `triplets.parquet` in HQ-Edit form (triplet_id, source_uri,
  instruction, target_uri, target_description),
- `queries.parquet` in CIRR form (query_id, reference_id, modification_text,
  target_id, shared_concept) whose targets are catalogue images.

The queries' references and targets are held out (`held_out_items`): the triplets and
the world models' training split (`training_edit`) never hold one.
"""
from __future__ import annotations

import io
import json
import math
import os
import random
from dataclasses import asdict, dataclass, replace

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from ops.storage import filesystem, write_bytes

ATTRIBUTES = {
    "shape": ["circle", "square", "triangle", "diamond", "cross", "star"],
    "colour": ["red", "green", "blue", "yellow", "purple", "orange", "pink", "cyan"],
    "size": ["small", "large"],
    "position": ["left", "centre", "right"],
    "background": ["white", "black", "grey", "beige", "navy"],
}
# 1,440 items: a benchmark gallery of 1,000 distinct images, with the 400 items of 200
# held-out queries never seen by any model's training.
RGB = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 70, 220), "yellow": (235, 210, 40),
    "purple": (140, 50, 170), "orange": (240, 140, 20), "white": (250, 250, 250), "black": (15, 15, 15),
    "grey": (128, 128, 128), "beige": (225, 210, 170), "pink": (245, 130, 190), "cyan": (40, 205, 215),
    "navy": (25, 35, 100),
}


@dataclass(frozen=True)
class Item:
    shape: str
    colour: str
    size: str
    position: str
    background: str

    def caption(self) -> str:
        return (
            f"a {self.size} {self.colour} {self.shape} on the {self.position}, {self.background} background"
        )

    def description(self) -> str:
        return (
            f"An image of a {self.size} {self.colour} {self.shape} placed on the {self.position} "
            f"side of a plain {self.background} background."
        )


def instruction(attribute: str, value: str) -> str:
    return {
        "shape": f"make it a {value}",
        "colour": f"change the colour to {value}",
        "size": f"make it {value}",
        "position": f"move it to the {value}",
        "background": f"change the background to {value}",
    }[attribute]


def draw(item: Item, size: int, rng: random.Random) -> Image.Image:
    """The item on its background; a little jitter so no two images are byte-identical."""
    im = Image.new("RGB", (size, size), RGB[item.background])
    d = ImageDraw.Draw(im)
    r = size * (0.14 if item.size == "small" else 0.3)
    cx = {"left": 0.27, "centre": 0.5, "right": 0.73}[item.position] * size + rng.uniform(-2, 2)
    cy = size * 0.5 + rng.uniform(-2, 2)
    fill = RGB[item.colour]
    if item.shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif item.shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif item.shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif item.shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif item.shape == "cross":
        w = r * 0.35
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:  # a five-pointed star, its inner corners at 0.45 r
        corners = [(r if k % 2 == 0 else 0.45 * r, math.pi * (k / 5 - 0.5)) for k in range(10)]
        d.polygon([(cx + a * math.cos(t), cy + a * math.sin(t)) for a, t in corners], fill=fill)
    return im


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def random_item(rng: random.Random) -> Item:
    return Item(**{k: rng.choice(v) for k, v in ATTRIBUTES.items()})


def edit(item: Item, rng: random.Random) -> tuple[str, str, Item]:
    attribute = rng.choice(list(ATTRIBUTES))
    value = rng.choice([v for v in ATTRIBUTES[attribute] if v != getattr(item, attribute)])
    return attribute, value, replace(item, **{attribute: value})


def _write_table(rows: list[dict], uri: str, s3: dict | None) -> None:
    fs, path = filesystem(uri, s3)
    pq.write_table(pa.Table.from_pylist(rows), path, filesystem=fs)


def num_combinations() -> int:
    return math.prod(len(v) for v in ATTRIBUTES.values())


def draw_queries(rng: random.Random, num_queries: int) -> list[tuple[Item, str, str, Item]]:
    """(reference, attribute, value, target) of each composed query: the first draws of
    the catalogue's generator, every reference and target a distinct item."""
    seen: set[Item] = set()
    queries = []
    while len(queries) < num_queries:
        ref = random_item(rng)
        attribute, value, target = edit(ref, rng)
        if ref in seen or target in seen:
            continue
        seen.update((ref, target))
        queries.append((ref, attribute, value, target))
    return queries


def held_out_items(num_queries: int, seed: int) -> frozenset[Item]:
    """The references and targets of the catalogue's queries (seed, num_queries): no
    training row of the world models or the triplets holds one, so every query's
    (item, edit) is new to every model that answers it."""
    return frozenset(it for r, _, _, t in draw_queries(random.Random(seed), num_queries) for it in (r, t))


def training_edit(rng: random.Random, held_out: frozenset[Item]) -> tuple[Item, str, str, Item]:
    """A random item and an edit of it, neither of them held out."""
    while True:
        item = random_item(rng)
        attribute, value, target = edit(item, rng)
        if item not in held_out and target not in held_out:
            return item, attribute, value, target


def make_catalogue(
    out_dir: str,
    num_images: int,
    image_size: int,
    num_triplets: int,
    num_queries: int,
    seed: int,
    s3: dict | None = None,
) -> dict[str, str]:
    """Writes the catalogue; returns the URIs of the manifest, triplets and queries."""
    combos = num_combinations()
    if 2 * num_queries > min(num_images, combos):
        raise ValueError(
            f"synthetic: need 2 * num_queries <= min(num_images, {combos}), "
            f"got num_queries={num_queries}, num_images={num_images}"
        )
    rng = random.Random(seed)
    # Queries first, so that each has its reference and target in the catalogue.
    drawn = draw_queries(rng, num_queries)
    items = [it for r, _, _, t in drawn for it in (r, t)]
    seen = set(items)
    queries = [(2 * n, 2 * n + 1, a, v) for n, (_, a, v, _) in enumerate(drawn)]
    while len(items) < num_images:
        it = random_item(rng)
        # Past the number of attribute combinations, items repeat (their jitter differs).
        if it not in seen or len(seen) == combos:
            seen.add(it)
            items.append(it)
    order = list(range(len(items)))
    rng.shuffle(order)  # references and targets are not neighbours in the manifest
    image_id = {k: f"img{n:05d}" for n, k in enumerate(order)}

    manifest = []
    for k in order:
        uri = f"{out_dir}/images/{image_id[k]}.png"
        write_bytes(uri, png(draw(items[k], image_size, rng)), s3)
        manifest.append(
            {"image_id": image_id[k], "uri": uri, "caption": items[k].caption(), **asdict(items[k])}
        )
    query_rows = [
        {
            "query_id": f"q{n:05d}",
            "reference_id": image_id[r],
            "modification_text": instruction(a, v),
            "target_id": image_id[t],
            "shared_concept": items[r].shape,
        }
        for n, (r, t, a, v) in enumerate(queries)
    ]
    triplets = []
    held_out = frozenset(items[: 2 * num_queries])
    for n in range(num_triplets):
        src, attribute, value, tgt = training_edit(rng, held_out)
        s_uri, t_uri = f"{out_dir}/triplets/t{n:05d}_source.png", f"{out_dir}/triplets/t{n:05d}_target.png"
        write_bytes(s_uri, png(draw(src, image_size, rng)), s3)
        write_bytes(t_uri, png(draw(tgt, image_size, rng)), s3)
        triplets.append(
            {
                "triplet_id": f"t{n:05d}",
                "source_uri": s_uri,
                "instruction": instruction(attribute, value),
                "target_uri": t_uri,
                "target_description": tgt.description(),
            }
        )
    uris = {
        "manifest": f"{out_dir}/manifest.parquet",
        "triplets": f"{out_dir}/triplets.parquet",
        "queries": f"{out_dir}/queries.parquet",
    }
    _write_table(manifest, uris["manifest"], s3)
    _write_table(triplets, uris["triplets"], s3)
    _write_table(query_rows, uris["queries"], s3)
    write_cirr_format(out_dir, [m["image_id"] for m in manifest], query_rows, seed, s3)
    return uris


def write_cirr_format(
    out_dir: str, image_ids: list[str], queries: list[dict], seed: int, s3: dict | None
) -> None:
    """The queries again in CIRR's official layout (the `val` split) under <out_dir>/cirr,
    with the catalogue folder as image root: `python -m pipelines benchmark` runs on it.
    Each img_set holds the reference, the target and four other images."""
    rng = random.Random(seed + 1)
    caps = []
    for n, q in enumerate(queries):
        others = [i for i in image_ids if i not in (q["reference_id"], q["target_id"])]
        members = [q["reference_id"], q["target_id"], *rng.sample(others, min(4, len(others)))]
        rng.shuffle(members)
        caps.append(
            {
                "pairid": n,
                "reference": q["reference_id"],
                "target_hard": q["target_id"],
                "target_soft": {q["target_id"]: 1.0},
                "caption": q["modification_text"],
                "img_set": {"id": n, "members": members},
            }
        )
    write_bytes(f"{out_dir}/cirr/captions/cap.rc2.val.json", json.dumps(caps, indent=1).encode(), s3)
    write_bytes(
        f"{out_dir}/cirr/image_splits/split.rc2.val.json",
        json.dumps({i: f"./images/{i}.png" for i in image_ids}, indent=1).encode(),
        s3,
    )


def tokenizer_corpus() -> list[str]:
    """Text the tiny models' tokenizers are trained on: the catalogue's words and prompts."""
    words = [w for vs in ATTRIBUTES.values() for w in vs]
    rng = random.Random(0)
    lines = [random_item(rng).description() for _ in range(200)]
    lines += [instruction(a, v) for a, vs in ATTRIBUTES.items() for v in vs]
    return lines + [" ".join(words)]


def build_demo_models(cfg) -> list[str]:
    """The tiny models of conf `tiny_models` at the configured model paths, where missing
    (models.build_tiny), taught the synthetic world when tiny_models.world says so
    (train_world_models); returns the paths built. The demo's and the tests' job, never
    a production stage's."""
    from model.tiny import build_tiny_mllm, build_tiny_t5_encoder
    from pipelines.config import model_source, plain

    if not cfg.models.build_tiny:
        return []
    # Every prompt the models are given, so that each is a few dozen tokens as Qwen's
    # tokenizer makes it: without the describer's templates its prompt was 96 to 140
    # tokens (words it had never met, spelt letter by letter), which made the world
    # models' language-modelling rows 150 tokens long and every description slower.
    corpus = tokenizer_corpus() + [
        cfg.caption.prompt_long,
        cfg.caption.prompt_short,
        cfg.models.embedder.query_instruction,
        cfg.models.embedder.candidate_instruction,
        cfg.rank.describe_template,
        cfg.rank.describe_template_no_concept,
    ]
    built = []
    for path in sorted({model_source(cfg, role) for role in ("captioner", "embedder", "describer")}):
        if not os.path.exists(os.path.join(path, "config.json")):
            build_tiny_mllm(path, plain(cfg.tiny_models.mllm), corpus, cfg.seed)
            built.append(path)
    t5 = cfg.models.text_encoder.name_or_path
    if cfg.models.text_encoder.kind == "t5" and not os.path.exists(os.path.join(t5, "config.json")):
        build_tiny_t5_encoder(t5, plain(cfg.tiny_models.t5), corpus, cfg.seed)
        built.append(t5)
    train_world_models(cfg, built)
    return built


def synth(cfg) -> dict[str, str]:
    """The catalogue of conf `synthetic`; returns its files' URIs."""
    s = cfg.synthetic
    return make_catalogue(
        s.out_dir, s.num_images, s.image_size, s.num_triplets, s.num_queries, cfg.seed, dict(cfg.storage.s3)
    )


def run(ctx) -> "Summary":
    """Stage `synth`: the synthetic world, its catalogue and (models.build_tiny) its models."""
    from pipelines.context import Summary

    s = ctx.cfg.synthetic
    if ctx.dry_run:
        return Summary("synth", note=f"dry run: would draw {s.num_images} images into {s.out_dir}")
    uris = synth(ctx.cfg)
    built = build_demo_models(ctx.cfg)
    return Summary(
        "synth",
        written=s.num_images,
        extra={"triplets": s.num_triplets, "queries": s.num_queries, "models_built": len(built)},
        note=f"manifest {uris['manifest']}",
    )


def _world_rows(cfg, n: int, rng: random.Random) -> list[tuple]:
    """The training split, without the catalogue's held-out query items: (item, image,
    an edit of it as an instruction, the edited item, its image)."""
    held_out = held_out_items(cfg.synthetic.num_queries, cfg.seed)
    size, rows = cfg.synthetic.image_size, []
    for _ in range(n):
        item, attribute, value, target = training_edit(rng, held_out)
        image, edited = draw(item, size, rng), draw(target, size, rng)
        rows.append((item, image, instruction(attribute, value), target, edited))
    return rows


def _lm_example(cfg, row: tuple, rng: random.Random) -> tuple:
    """(image, prompt, answer) of one of the captioner's two prompts or the describer's."""
    from ops.rank import describe_prompt

    item, image, modification, target, _ = row
    kind = rng.randrange(3)
    if kind == 0:
        return image, cfg.caption.prompt_long, item.description()
    if kind == 1:
        return image, cfg.caption.prompt_short, item.caption()
    concept = item.shape if rng.random() < 0.5 else None
    prompt = describe_prompt(cfg.rank.describe_template, cfg.rank.describe_template_no_concept,
                             modification, concept)
    return image, prompt, target.description()


def train_world_models(cfg, built: list[str]) -> dict[str, float]:
    """Teaches the tiny models just built (paths in `built`) the synthetic world, in this
    process (conf tiny_models.world); returns each trained path's last loss."""
    import torch
    from tqdm import tqdm

    from model.contrastive import info_nce
    from model.lm_loss import caption_loss
    from model.mllm import FusedEmbedder, load_mllm_from_conf
    from pipelines.config import model_source, plain

    w, m = cfg.tiny_models.world, cfg.models
    roles = {}
    for role, steps in (("captioner", w.lm_steps), ("describer", w.lm_steps), ("embedder", w.embedder_steps)):
        path = model_source(cfg, role)
        if path in built and steps > 0:
            roles.setdefault(path, set()).add("lm" if role != "embedder" else "embedder")
    if not roles:
        return {}
    rng = random.Random(cfg.seed * 7919 + 1)  # apart from the catalogue's draws of the seed
    rows = _world_rows(cfg, w.num_items, rng)
    losses, taught = {}, None
    # The MLLM first: an embedder of its own path then starts from it, as GME starts from
    # Qwen2-VL (what the MLLM learnt to see, the embedder need not learn again).
    for path, kinds in sorted(roles.items(), key=lambda kv: ("lm" not in kv[1], kv[0])):
        torch.manual_seed(cfg.seed)
        start = taught if kinds == {"embedder"} and taught else path
        conf = {**plain(m.embedder if "embedder" in kinds else m.captioner), "name_or_path": start}
        embedder = FusedEmbedder.from_conf(conf) if "embedder" in kinds else None
        mllm = embedder.mllm if embedder else load_mllm_from_conf(conf)
        mllm.model.train()
        opt = torch.optim.AdamW(mllm.model.parameters(), lr=w.lr)
        for kind in [k for k in ("lm", "embedder") if k in kinds]:
            steps = w.lm_steps if kind == "lm" else w.embedder_steps
            bar = tqdm(range(steps), desc=f"world model {os.path.basename(path)} ({kind})", mininterval=5)
            for _ in bar:
                picks = [rng.randrange(len(rows)) for _ in range(w.batch_size)]
                batch = [rows[i] for i in picks]
                if kind == "lm":
                    images, prompts, answers = zip(*(_lm_example(cfg, r, rng) for r in batch))
                    # A row's image is its index (its prompt is in the kept row's key):
                    # 64,000 draws of about 8,000 (row, prompt) pairs at the demo's length.
                    loss = caption_loss(mllm, images, prompts, answers, image_keys=picks)
                else:
                    # Each row's item beside its edited twin, one attribute apart: the batch's
                    # hardest negatives, without which colour and background alone tell
                    # most items apart and shape and position are never learnt.
                    half = batch[: len(batch) // 2]
                    items = [it for r in half for it in (r[0], r[3])]
                    images = [im for r in half for im in (r[1], r[4])]
                    texts = [it.caption() if rng.random() < 0.5 else it.description() for it in items]
                    # GME's one space: an image with its caption (the fused vectors Stage 1
                    # learns and Stage 2 aims at) lands where the image alone does, since
                    # the gallery is ranked by the image alone. Images, texts and pairs go
                    # through the model in one forward, as finetune's tasks do.
                    n = len(images)
                    image, text, pair = embedder.trainable_vectors(
                        images=[*images, *[None] * n, *images], texts=[*[None] * n, *texts, *texts],
                        side=["candidate"] * n + ["query"] * n + ["candidate"] * n,
                    ).split(n)
                    loss = info_nce(text, image, w.temperature) + info_nce(pair, image, w.temperature)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(mllm.model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            losses[f"{path} ({kind})"] = round(loss.item(), 4)
        mllm.model.eval()
        mllm.model.save_pretrained(path)
        taught = path if "lm" in kinds else taught
        with open(os.path.join(path, "world.json"), "w") as f:
            json.dump({"trained_on": "the synthetic world's training split", "items": w.num_items,
                       "started_from": start,
                       "lm_steps": w.lm_steps if "lm" in kinds else 0,
                       "embedder_steps": w.embedder_steps if "embedder" in kinds else 0,
                       "last_loss": losses}, f)
    print(f"[world models] trained {', '.join(f'{k}: loss {v}' for k, v in losses.items())}", flush=True)
    return losses
