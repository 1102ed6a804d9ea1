"""The one config system: conf/base.yaml (every knob, documented) < deployment file < key=value.

The shipped layers (base, demo, prod, catalogue, eval/*, bench/*) are package data under
pipelines/conf, found through importlib.resources, so an installed `cirpipe` has them in
any folder: `--config demo` names the shipped demo layer, `--config my.yaml` a file.

The config is checked whole when it is loaded, before Ray starts or any model loads,
and each problem is a ConfigError of one line naming the key, the value and what is
allowed: an unknown key (and the file or argument it came from), a wrong type, a
value outside its enumeration or range (RULES below), and the rules that tie keys
together (CROSS_RULES). The knobs are documented once, in conf/base.yaml; RULES only
says which values each one accepts.

Benchmark-only sections live in conf/bench/schema.yaml, a second schema the benchmark
scripts pass to load_config (`schemas=`); the pipeline never sees them.
"""
from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from model.errors import PipelineError
from model.kinds import PREDICTION_TYPES
from pipelines.registry import STAGES

CONF_DIR = Path(str(files("pipelines").joinpath("conf")))
BASE = CONF_DIR / "base.yaml"
BENCH_SCHEMA = CONF_DIR / "bench" / "schema.yaml"


class ConfigError(PipelineError):
    pass


def _check_keys(node: Any, base: Any, where: str, path: str = "") -> None:
    """Every key of `node` must exist in `base`, and hold a value of the same type."""
    if isinstance(base, DictConfig):
        if not isinstance(node, DictConfig):
            raise ConfigError(
                f"{where}: {path or 'the config'} must be a mapping (like conf/base.yaml), got {node!r}"
            )
        if len(base) == 0:
            return  # an empty mapping in base.yaml is free-form (arguments passed through to a library)
        for key in node.keys():
            full = f"{path}.{key}" if path else str(key)
            if key not in base:
                raise ConfigError(f"{where}: unknown key {full!r} (not in conf/base.yaml)")
            _check_keys(node._get_node(key), base._get_node(key), where, full)
        return
    if not hasattr(node, "_is_interpolation") or node._is_interpolation() or base._is_interpolation():
        return  # checked after resolution, in _check_types
    _check_value(node._value(), base._value(), where, path)


def _check_value(value: Any, default: Any, where: str, path: str) -> None:
    if value is None or default is None:
        return  # null defaults take a string (paths, endpoints) or null
    expected = type(default)
    if expected is float and type(value) is int:
        return
    if type(value) is not expected:
        raise ConfigError(
            f"{where}: {path} must be {expected.__name__} (like {default!r} in conf/base.yaml), "
            f"got {type(value).__name__} {value!r}"
        )


def _check_types(cfg: Any, base: Any, path: str = "") -> None:
    for key in base.keys():
        full = f"{path}.{key}" if path else str(key)
        b, c = base[key], cfg[key]
        if isinstance(b, (DictConfig, dict)):
            _check_types(c, b, full)
        elif not isinstance(b, (ListConfig, list)):
            _check_value(c, b, "resolved config", full)


# Spellings YAML 1.1 reads as booleans; only true/false are taken, so that a typo such
# as `train.use_gpu=yes` is refused rather than silently read as true.
_BOOL_WORDS = {"yes", "no", "on", "off", "y", "n"}


def _parse_override(arg: str) -> DictConfig:
    if "=" not in arg:
        raise ConfigError(f"override {arg!r} is not key=value")
    key, value = arg.split("=", 1)
    if value.strip().lower() in _BOOL_WORDS:
        raise ConfigError(f"override {arg!r}: {key} takes true or false, not {value!r}")
    try:
        return OmegaConf.from_dotlist([arg])
    except OmegaConfBaseException as e:
        raise ConfigError(f"override {arg!r}: {e}") from None


def load_config(
    paths: str | os.PathLike | Sequence[str | os.PathLike] | None,
    overrides: Sequence[str] = (),
    schemas: Sequence[Path] = (BASE,),
) -> DictConfig:
    """Base < deployment file(s) `paths`, in order < `overrides` (key=value), checked and resolved.

    Several files layer like overrides: a benchmark's file holds only what it changes
    in the deployment it starts from (conf/bench/data.yaml on conf/demo.yaml).
    `schemas` are the files that define the keys (base.yaml; the benchmarks add
    conf/bench/schema.yaml).
    """
    base = OmegaConf.merge(*[OmegaConf.load(s) for s in schemas])
    layers: list[tuple[str, DictConfig]] = []
    if paths is None:
        paths = []
    elif isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for path in map(config_file, paths):
        try:
            layers.append((str(path), OmegaConf.load(path)))
        except Exception as e:  # yaml errors carry the line; keep them, name the file
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    layers += [(f"override {o!r}", _parse_override(o)) for o in overrides]
    cfg = base
    for where, layer in layers:
        _check_keys(layer, base, where)
        cfg = OmegaConf.merge(cfg, layer)
    _absolute_paths(cfg)
    try:
        resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    except OmegaConfBaseException as e:
        raise ConfigError(f"config could not be resolved: {e}") from None
    _check_types(resolved, OmegaConf.create(OmegaConf.to_container(base, resolve=True)))
    check_rules(resolved)
    OmegaConf.set_readonly(resolved, True)
    OmegaConf.set_struct(resolved, True)
    return resolved


def shipped_layers() -> list[str]:
    """The layer names `--config` takes besides a file: demo, prod, catalogue, eval/cirr, ..."""
    return sorted(str(p.relative_to(CONF_DIR).with_suffix("")) for p in CONF_DIR.rglob("*.yaml")
                  if p.name not in ("base.yaml", "schema.yaml") and "examples" not in p.parts)


def config_file(path: str | os.PathLike) -> Path:
    """A config file given by its path, or a shipped layer by its name (`demo`, `eval/cirr`;
    `conf/prod.yaml`, a checkout's path of a shipped layer, names it too)."""
    if Path(path).is_file():
        return Path(path)
    name = str(path).removesuffix(".yaml").removeprefix("conf/")
    if name in shipped_layers():
        return CONF_DIR / f"{name}.yaml"
    raise ConfigError(f"config file {str(path)!r} does not exist, and is none of the shipped layers "
                      f"({', '.join(shipped_layers())})")


# Ray workers (Ray Train's above all) run in folders of their own, so a relative path is
# taken from where the config is loaded. Keys that name a folder or file of the run,
# never a hub id:
PATH_KEYS = ("run_dir", "storage.root", "synthetic.out_dir", "catalogue.*", "train_stage*.output",
             "finetune_embedder.output", "eval.annotations", "eval.image_root", "eval.out_dir")
# Keys that name a hub id or a folder: a relative one is a folder when it exists here
# (from_pretrained's own rule: a local folder wins over the hub).
MODEL_KEYS = ("models.*.name_or_path", "train_stage2.prior", "finetune_embedder.base")


def _absolute_paths(cfg: DictConfig) -> None:
    """Every relative local path among PATH_KEYS and MODEL_KEYS made absolute, in place;
    interpolations (${run_dir}/...) follow run_dir."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    for patterns, always in ((PATH_KEYS, True), (MODEL_KEYS, False)):
        for pattern in patterns:
            for key, value in list(_matching(raw, pattern)):
                if (not isinstance(value, str) or not value or "${" in value or "://" in value
                        or os.path.isabs(value) or not (always or os.path.exists(value))):
                    continue
                OmegaConf.update(cfg, key, os.path.abspath(value), merge=False)


# ------------------------------------------------------------------ allowed values
# Which values each knob accepts (its meaning is documented in conf/base.yaml). A key
# pattern's `*` stands for any one section name (models.*.dtype).


class Rule:
    def __init__(self, describe: str, ok):
        self.describe, self.ok = describe, ok


def one_of(*values) -> Rule:
    return Rule("one of " + ", ".join(map(str, values)), lambda v: v in values)


def each_of(*values) -> Rule:
    return Rule(
        "a list of " + ", ".join(map(str, values)),
        lambda v: isinstance(v, (list, ListConfig)) and all(x in values for x in v),
    )


def at_least(lo) -> Rule:
    return Rule(f">= {lo}", lambda v: v >= lo)


def above(lo) -> Rule:
    return Rule(f"> {lo}", lambda v: v > lo)


def between(lo, hi) -> Rule:
    return Rule(f"in [{lo}, {hi}]", lambda v: lo <= v <= hi)


def below_one() -> Rule:
    return Rule("in [0, 1)", lambda v: 0 <= v < 1)


DEVICE = Rule(
    "cpu, cuda or cuda:<n>",
    lambda v: v == "cpu" or v == "cuda" or (v.startswith("cuda:") and v[5:].isdigit()),
)
POSITIVE = at_least(1)
COUNT = at_least(0)
PROBABILITY = between(0, 1)
# The rank stage's modes (ops/rank.py needs() says which models each one loads).
RANK_MODES = ("full", "query_only", "prior_only", "joint", "text")
# The stages `nightly.stages` may list: the registry's, but synth (nightly runs it
# itself when synthetic.enabled and the manifest is missing).
NIGHTLY_STAGES = tuple(name for name in STAGES if name != "synth")

RULES: dict[str, Rule] = {
    "seed": COUNT,
    "ray.num_cpus": POSITIVE, "ray.read_min_blocks": POSITIVE, "ray.model_ops": one_of("actors", "tasks"),
    "ray.shuffle_strategy": one_of(None, "shuffle_v2", "sort_shuffle_pull_based", "hash_shuffle",
                                   "sort_shuffle_push_based"),
    "lock.wait_s": at_least(0), "lock.poll_s": above(0), "lock.heartbeat_s": above(0),
    "lock.stale_after_s": above(0),
    "images.min_side": POSITIVE,
    "images.max_side": POSITIVE,
    "images.max_pixels": POSITIVE,
    "synthetic.num_images": POSITIVE,
    "synthetic.image_size": at_least(16),
    "synthetic.num_triplets": COUNT,
    "synthetic.num_queries": COUNT,
    "models.*.dtype": one_of("float32", "float16", "bfloat16"),
    "models.*.device": DEVICE,
    "models.*.image_min_pixels": POSITIVE,
    "models.*.image_max_pixels": POSITIVE,
    "models.*.attn_implementation": one_of("sdpa", "eager", "flash_attention_2"),
    "models.*.preprocess_threads": POSITIVE,
    "models.*.input_cache_rows": COUNT,
    "models.*.vision_attention": one_of("per_image", "padded", "flex"),
    "models.*.device_map": one_of(None, "auto"),
    "models.embedder.overlap_parts": POSITIVE,
    "models.embedder.dim": POSITIVE,
    "models.embedder.max_tokens": COUNT,
    "models.captioner.image_pixels_per_token": POSITIVE,
    "preflight.gpu_memory_gib": above(0),
    "preflight.memory_headroom": at_least(1),
    "models.embedder.position_ids": one_of("sequential", "mrope"),
    "models.embedder.pre_resize_factor": POSITIVE,
    "models.embedder.pre_resize_min_pixels": POSITIVE,
    "models.embedder.pre_resize_max_pixels": POSITIVE,
    "models.text_encoder.kind": one_of("t5", "mllm"),
    "models.text_encoder.max_tokens": POSITIVE,
    "tiny_models.mllm.*": POSITIVE,
    "tiny_models.t5.*": POSITIVE,
    "tiny_models.world.num_items": POSITIVE,
    "tiny_models.world.lm_steps": COUNT,
    "tiny_models.world.embedder_steps": COUNT,
    "tiny_models.world.batch_size": POSITIVE,
    "tiny_models.world.lr": above(0),
    "tiny_models.world.temperature": above(0),
    "*.batch_size": POSITIVE,
    "*.num_actors": POSITIVE,
    "*.num_cpus_per_actor": above(0),
    "*.num_gpus_per_actor": COUNT,
    "rank.search_num_gpus": COUNT,
    "ingest.duplicate_check_partitions": POSITIVE,
    "ingest.duplicate_check_local_max_rows": COUNT,
    "caption.max_new_tokens_long": POSITIVE,
    "caption.max_new_tokens_short": POSITIVE,
    "caption.backend": one_of("transformers", "vllm"),
    "caption.kv_cache": one_of("dynamic", "static", "static_compiled"),
    "caption.vllm.batch_size": POSITIVE,
    "caption.vllm.max_model_len": POSITIVE,
    "embed.pair_short_fraction": PROBABILITY,
    **{f"prior.{k}": above(0) for k in ("map_channels", "map_size", "patch_size", "hidden_size", "num_heads",
                                          "mlp_ratio", "num_encoder_blocks", "num_decoder_blocks",
                                          "frequency_size")},
    "prior.prediction_type": one_of(*PREDICTION_TYPES),
    "diffusion.num_train_timesteps": POSITIVE,
    "diffusion.beta_schedule": one_of("linear", "scaled_linear", "squaredcos_cap_v2"),
    "diffusion.beta_start": above(0),
    "diffusion.beta_end": above(0),
    "diffusion.p_cfg": PROBABILITY,
    "diffusion.embedding_scale": at_least(0),
    "sampling.sampler": one_of("dpmsolver++", "ddpm"),
    "sampling.num_steps": POSITIVE,
    "sampling.guidance_scale": at_least(0),
    "sampling.control_scale": at_least(0),
    "sampling.samples_per_query": POSITIVE,
    "sampling.aggregation": one_of("mean", "none"),
    "sampling.compile": one_of("none", "default", "reduce-overhead", "max-autotune-no-cudagraphs"),
    "train.num_workers": POSITIVE,
    "train.cpus_per_worker": above(0),
    # CUDA graphs (reduce-overhead) are left out: per-block graphs around autograd gain
    # little and pin memory for every captured shape.
    "train.compile": one_of("none", "default", "max-autotune-no-cudagraphs"),
    "train.seed": COUNT,
    "train.micro_batch_size": COUNT,
    "train.text_conditions": one_of("worker", "precomputed"),
    "train.condition_cache_texts": COUNT,
    "train.checkpoint_every": POSITIVE,
    "train.health_check_interval_s": above(0),
    "train.keep_checkpoints": POSITIVE,
    "train.max_failures": COUNT,
    "train.log_every": POSITIVE,
    "train.shuffle_buffer": COUNT,
    "train.materialize_max_rows": COUNT,
    "train.key_order_rows_per_block": POSITIVE,
    "train_stage*.lr": above(0),
    "train_stage*.weight_decay": at_least(0),
    "train_stage*.adam_eps": above(0),
    "train_stage*.grad_clip": above(0),
    "train_stage*.warmup_steps": COUNT,
    "train_stage*.lr_schedule": one_of("cosine", "constant"),
    "train_stage*.epochs": POSITIVE,
    "train_stage*.max_steps": COUNT,
    "train_stage*.ema_decay": below_one(),
    "train_stage2.condition_text": one_of("instruction", "description", "described"),
    "finetune_embedder.dtype": one_of("float32", "bfloat16"),
    "finetune_embedder.caption_column": one_of("caption_long", "caption_short"),
    "finetune_embedder.temperature": above(0),
    "finetune_embedder.weight_*": at_least(0),
    "finetune_embedder.lora_rank": COUNT,
    "finetune_embedder.lora_alpha": above(0),
    "finetune_embedder.lr": above(0),
    "finetune_embedder.weight_decay": at_least(0),
    "finetune_embedder.adam_eps": above(0),
    "finetune_embedder.grad_clip": above(0),
    "finetune_embedder.warmup_steps": COUNT,
    "finetune_embedder.lr_schedule": one_of("cosine", "constant"),
    "finetune_embedder.batch_size": POSITIVE,
    "finetune_embedder.epochs": POSITIVE,
    "finetune_embedder.max_steps": COUNT,
    "index.kind": one_of("IVF_PQ", "IVF_HNSW_SQ"),
    "index.num_partitions": COUNT,
    "index.num_sub_vectors": COUNT,
    "index.min_rows": POSITIVE,
    "index.nprobes": POSITIVE,
    "index.refine_factor": POSITIVE,
    "rank.mode": one_of(*RANK_MODES),
    "rank.text_query": one_of("prior", "embedding"),
    "rank.joint_weight": PROBABILITY,
    "rank.top_k": POSITIVE,
    "rank.search": one_of("exact", "ann"),
    "rank.describe_max_new_tokens": POSITIVE,
    "rank.device": DEVICE,
    "rank.search_batch_size": POSITIVE,
    "rank.gallery_block": POSITIVE,
    "rank.search_device": one_of("auto", "cpu", "cuda"),
    "plan.*.per_s": above(0),
    "compact.min_fragments": COUNT,
    "rank.keep_runs": COUNT,
    "*.commit_every": COUNT,
    "ingest.max_delete_fraction": PROBABILITY,
    "ingest.delete_batch_size": POSITIVE,
    "ingest.stat_threads": POSITIVE,
    "compact.target_rows_per_fragment": POSITIVE,
    "compact.keep_versions_days": COUNT,
    "report.num_queries": POSITIVE,
    "report.top_k": POSITIVE,
    "report.thumbnail_size": at_least(16),
    "nightly.stages": each_of(*NIGHTLY_STAGES),
    "eval.benchmark": one_of("cirr", "fashioniq", "circo"),
    "eval.fashioniq_captions": one_of("searle", "pic2word"),
    "eval.modes": each_of(*RANK_MODES),
    "eval.base_embedder_modes": each_of(*RANK_MODES),
}


def _matching(cfg, pattern: str):
    """(key, value) pairs of the leaves of `cfg` that `pattern` names."""

    def walk(node, parts, path):
        if not parts:
            yield path, node
            return
        head, rest = parts[0], parts[1:]
        if not isinstance(node, (DictConfig, dict)):
            return
        keys = list(node.keys()) if head.endswith("*") else [head]
        for k in keys:
            if head.endswith("*") and not str(k).startswith(head[:-1]):
                continue
            if k in node:
                yield from walk(node[k], rest, f"{path}.{k}" if path else str(k))

    yield from walk(cfg, pattern.split("."), "")


def _cross_rules(cfg) -> list[tuple[str, object, str]]:
    """(key, value, what is allowed) of each broken rule that ties keys together."""
    broken = []
    for stage in ("train_stage1", "train_stage2", "finetune_embedder"):
        b, w = cfg[stage].batch_size, cfg.train.num_workers
        if b % w:
            broken.append((f"{stage}.batch_size", b, f"a multiple of train.num_workers={w}"))
    for name, m in cfg.models.items():
        if isinstance(m, DictConfig) and "image_max_pixels" in m and m.image_max_pixels < m.image_min_pixels:
            broken.append(
                (
                    f"models.{name}.image_max_pixels",
                    m.image_max_pixels,
                    f">= models.{name}.image_min_pixels={m.image_min_pixels}",
                )
            )
    c, v = cfg.models.captioner, cfg.caption.vllm
    need = c.image_max_pixels // c.image_pixels_per_token + cfg.caption.max_new_tokens_long
    if cfg.caption.backend == "vllm" and v.max_model_len < need:
        broken.append(("caption.vllm.max_model_len", v.max_model_len,
                       f">= {need} (the largest image's tokens, models.captioner.image_max_pixels / "
                       f"image_pixels_per_token, plus caption.max_new_tokens_long)"))
    f = cfg.finetune_embedder
    if f.weight_text_to_image == 0 and f.weight_target_text == 0 and f.weight_pair_to_image == 0:
        broken.append(("finetune_embedder.weight_target_text", 0,
                       "> 0 when finetune_embedder.weight_text_to_image and weight_pair_to_image are 0 "
                       "(one task at least)"))
    if str(f.output).startswith("s3://"):
        broken.append(("finetune_embedder.output", f.output,
                       "a filesystem path (embed loads it with from_pretrained, which reads folders)"))
    e = cfg.models.embedder
    if e.pre_resize_max_pixels < e.pre_resize_min_pixels:
        broken.append(("models.embedder.pre_resize_max_pixels", e.pre_resize_max_pixels,
                       f">= models.embedder.pre_resize_min_pixels={e.pre_resize_min_pixels}"))
    p = cfg.prior
    if p.map_size % p.patch_size:
        broken.append(("prior.map_size", p.map_size, f"a multiple of prior.patch_size={p.patch_size}"))
    if p.hidden_size % p.num_heads:
        broken.append(("prior.hidden_size", p.hidden_size, f"a multiple of prior.num_heads={p.num_heads}"))
    sub = cfg.index.num_sub_vectors
    if sub and cfg.models.embedder.dim % sub:
        broken.append(
            ("index.num_sub_vectors", sub, f"a divisor of models.embedder.dim={cfg.models.embedder.dim}")
        )
    if cfg.lock.stale_after_s <= cfg.lock.heartbeat_s:
        heartbeat = cfg.lock.heartbeat_s
        broken.append(("lock.stale_after_s", cfg.lock.stale_after_s, f"> lock.heartbeat_s={heartbeat}"))
    if cfg.images.max_side < cfg.images.min_side:
        broken.append(("images.max_side", cfg.images.max_side, f">= images.min_side={cfg.images.min_side}"))
    if cfg.ray.model_ops == "tasks":
        for section, node in cfg.items():
            if isinstance(node, DictConfig) and node.get("num_gpus_per_actor"):
                broken.append((f"{section}.num_gpus_per_actor", node.num_gpus_per_actor,
                               "0 with ray.model_ops=tasks (a worker that keeps its models would keep "
                               "their GPU memory after the stage: set ray.model_ops=actors)"))
    return broken


def check_rules(cfg) -> None:
    """Every value inside its rule (RULES, then the cross-field ones): the first broken
    one is refused, naming the key, the value and what is allowed."""
    for pattern, rule in RULES.items():
        for key, value in _matching(cfg, pattern):
            if value is None or isinstance(value, (DictConfig, dict)):
                continue
            try:
                ok = rule.ok(value)
            except TypeError:  # a string where a number belongs (null defaults take any type)
                ok = False
            if not ok:
                raise ConfigError(f"{key}={_show(value)}: expected {rule.describe}")
    for key, value, allowed in _cross_rules(cfg):
        raise ConfigError(f"{key}={_show(value)}: expected {allowed}")


def _show(value) -> str:
    if isinstance(value, ListConfig):
        value = OmegaConf.to_container(value)
    return str(value) if not isinstance(value, str) else repr(value)


def plain(node) -> dict:
    """A config section as a plain dict, as ops take it (ops know nothing of OmegaConf)."""
    return OmegaConf.to_container(node, resolve=True)


def model_source(cfg, role: str) -> str:
    """The folder whose config, processor and weights stand for models.<role> before the
    run: its own path, or finetune_embedder.base when the path is the fine-tuned
    embedder that this deployment's finetune_embedder stage writes (and has not yet)."""
    import os

    path = cfg.models[role].name_or_path
    made_here = "finetune_embedder" in cfg.nightly.stages and path == cfg.finetune_embedder.output
    if made_here and not os.path.exists(os.path.join(path, "config.json")):
        return cfg.finetune_embedder.base
    return path
