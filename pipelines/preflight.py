"""`python -m pipelines preflight`: everything that can be checked before a GPU-hour is
spent, in one table of OK / PROBLEM lines, each problem with its fix.

- every configured model: its config, processor and tokenizer load (no weights);
- dims: the embedder's hidden size against models.embedder.dim, and the lake's vector
  tables against it;
- memory: each model's weights (counted on the meta device) times
  preflight.memory_headroom against the GPUs its actor asks for, of
  preflight.gpu_memory_gib each;
- the catalogue's inputs that the nightly's stages read (manifest, queries, triplets):
  there, with their columns; the checkpoints a rank mode needs that no stage of the
  night trains;
- the store: a file written, read back and deleted under storage.root;
- the cluster: each stage's actor fits what Ray has (unless ray.autoscaling).

Reads the lake, writes one probe file and removes it; holds no lock.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass

from model.errors import PipelineError


class PreflightFailed(PipelineError):
    """At least one check of preflight found a problem (the table says which)."""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


# The actor that loads each MLLM role: its conf section (whose num_gpus_per_actor it gets).
MODEL_ACTORS = {"captioner": "caption", "embedder": "embed", "describer": "rank"}
# Stages whose actors ask the cluster for CPUs and GPUs.
ACTOR_SECTIONS = ("caption", "embed", "triplets", "conditions", "rank")


def _attempt(name: str, fn, fix: str) -> Check:
    try:
        return Check(name, True, fn())
    except Exception as e:  # noqa: BLE001 (each failure becomes a PROBLEM line)
        return Check(name, False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", fix)


def model_checks(cfg) -> list[Check]:
    from transformers import AutoConfig

    from model.mllm import load_processor
    from model.text_encoder import text_encoder_dim
    from pipelines.config import model_source

    out = []
    for role in MODEL_ACTORS:
        src = model_source(cfg, role)
        made = "" if src == cfg.models[role].name_or_path else " (finetune_embedder's base)"
        out.append(_attempt(
            f"models.{role}: config, processor, tokenizer",
            lambda src=src, made=made: f"{src}{made}: {type(load_processor(src)).__name__}",
            f"point models.{role}.name_or_path at a Qwen-VL checkpoint folder (config.json, "
            "preprocessor_config.json, tokenizer files) or a hub id reachable from here",
        ))
    e, embedder = cfg.models.embedder, model_source(cfg, "embedder")

    def embedder_dim() -> str:
        hidden = AutoConfig.from_pretrained(embedder).get_text_config().hidden_size
        if hidden != e.dim:
            raise PipelineError(f"{embedder} has hidden size {hidden}, models.embedder.dim is {e.dim}")
        return f"d_VL = {hidden}"

    out.append(_attempt("models.embedder: dim", embedder_dim,
                        "set models.embedder.dim to the embedder's hidden size (GME-2B: 1536)"))
    te = cfg.models.text_encoder

    def text_encoder() -> str:
        from transformers import AutoTokenizer

        # kind mllm: the embedder's text branch, read where the embedder is now (its base
        # before the first night's finetune_embedder writes it).
        dim = text_encoder_dim(dict(te), {**dict(e), "name_or_path": embedder})
        if te.kind == "t5":
            AutoTokenizer.from_pretrained(te.name_or_path)
        return f"{te.kind} {te.name_or_path if te.kind == 't5' else embedder}: conditions of size {dim}"

    out.append(_attempt("models.text_encoder: config, tokenizer", text_encoder,
                        "point models.text_encoder.name_or_path at a T5 checkpoint (spiece.model needs "
                        "the sentencepiece package, a dependency of this project)"))
    return out


def memory_checks(cfg) -> list[Check]:
    import math

    from model.memory import GIB, weights_bytes
    from pipelines.config import model_source

    p, out = cfg.preflight, []
    for role, section in MODEL_ACTORS.items():
        m, name = cfg.models[role], f"models.{role}: memory"
        if not m.device.startswith("cuda"):
            out.append(Check(name, True, f"on {m.device}: no GPU memory check"))
            continue
        asked = cfg[section].num_gpus_per_actor
        gpus = asked if m.device_map else min(asked, 1)
        try:
            need = weights_bytes(model_source(cfg, role), m.dtype) * p.memory_headroom
        except Exception as e:  # noqa: BLE001 (the model checks above name the cause)
            out.append(Check(name, False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}",
                             f"fix models.{role}.name_or_path first"))
            continue
        line = (f"{need / GIB:.1f} GiB ({m.dtype} weights x {p.memory_headroom}) on {gpus} GPU(s) of "
                f"{p.gpu_memory_gib} GiB (its actor asks for {asked})")
        fewest = math.ceil(need / (p.gpu_memory_gib * GIB))
        out.append(Check(name, need <= gpus * p.gpu_memory_gib * GIB, line,
                         f"set {section}.num_gpus_per_actor >= {fewest} and models.{role}.device_map: auto"
                         if fewest > 1 else f"set {section}.num_gpus_per_actor: 1"))
    return out


def lake_checks(ctx) -> list[Check]:
    from ops.storage import delete_file, read_bytes, write_bytes
    from pipelines.lake import check_vector_dim

    cfg, lake = ctx.cfg, ctx.lake
    probe = f"{cfg.storage.root.rstrip('/')}/_preflight/{uuid.uuid4().hex}"
    s3 = dict(cfg.storage.s3)

    def store() -> str:
        write_bytes(probe, b"preflight", s3)
        if read_bytes(probe, s3) != b"preflight":
            raise PipelineError(f"{probe} read back other bytes than were written")
        delete_file(probe, s3)
        return f"{cfg.storage.root}: written, read back, deleted"

    out = [_attempt("storage.root: reachable, writable", store,
                    "check storage.root, storage.s3.* (endpoint, region, credentials) and the "
                    "bucket's policy")]
    if not out[0].ok:
        return out  # the tables live there: nothing more to read
    for table, column in (("embeddings", "vector"), ("triplet_embeddings", "z_query")):
        def dims(table=table, column=column) -> str:
            ds = lake.open(table)
            if ds is None:
                return "not written yet"
            check_vector_dim(ds, cfg.models.embedder.dim, lake.uri(table), column)
            return f"{column} of size {cfg.models.embedder.dim}"

        out.append(_attempt(f"table {table}: dims", dims,
                            "point storage.root at a new lake, or models.embedder at the model that "
                            "wrote it"))
    return out


def input_checks(cfg) -> list[Check]:
    """The catalogue's inputs and the rank mode's checkpoints, as `nightly` checks them
    before its first stage (pipelines/common.py `check_inputs`)."""
    from pipelines.common import check_inputs
    from ops.storage import filesystem

    fs, path = filesystem(cfg.catalogue.manifest, dict(cfg.storage.s3))
    if cfg.synthetic.enabled and fs.get_file_info(path).type.name == "NotFound":
        return [Check("catalogue inputs", True, "drawn by the synth stage (synthetic.enabled)")]
    try:
        return [Check(what, True, detail) for what, detail in check_inputs(cfg, list(cfg.nightly.stages))]
    except PipelineError as e:
        return [Check("catalogue inputs and checkpoints", False, str(e),
                      "point the catalogue.* keys at the tables (conf/examples/ has one of each), or "
                      "train the checkpoints first")]


def cluster_checks(ctx) -> list[Check]:
    cfg, out = ctx.cfg, []
    if cfg.ray.autoscaling:
        return [Check("cluster: resources", True, "ray.autoscaling: nodes come on demand, not checked")]
    ctx.start_ray()
    for section in ACTOR_SECTIONS:
        s = cfg[section]
        out.append(_attempt(
            f"cluster: {section} actors",
            lambda s=s, section=section: ctx.require(
                f"{section} (each actor)", s.num_cpus_per_actor, s.get("num_gpus_per_actor", 0),
                f"{section}.num_cpus_per_actor / num_gpus_per_actor",
            ) or f"{s.num_cpus_per_actor:g} CPU, {s.get('num_gpus_per_actor', 0):g} GPU each: available",
            f"lower {section}.num_cpus_per_actor / num_gpus_per_actor or add nodes",
        ))
    return out


def run(ctx) -> list[Check]:
    """Every check, in order; prints the table; raises PreflightFailed on a problem."""
    checks = (model_checks(ctx.cfg) + memory_checks(ctx.cfg) + input_checks(ctx.cfg) + lake_checks(ctx)
              + cluster_checks(ctx))
    print(render(checks))
    problems = [c for c in checks if not c.ok]
    if problems:
        raise PreflightFailed(
            f"preflight: {len(problems)} of {len(checks)} checks found a problem (table above)"
        )
    return checks


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{'OK     ' if c.ok else 'PROBLEM'}  {c.name:<{width}}  {c.detail}")
        if not c.ok:
            lines.append(f"{'':7}  {'':<{width}}  fix: {c.fix}")
    ok = sum(c.ok for c in checks)
    lines.append(f"[preflight] {ok} OK, {len(checks) - ok} problems")
    return "\n".join(lines)
