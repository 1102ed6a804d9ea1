"""Caption: a batch of `images` rows -> `captions` rows (long and short caption)."""
from __future__ import annotations

import pyarrow as pa

from model.mllm import Captioner, load_mllm_from_conf
from ops.images import ImageRejected, load_image
from ops.schemas import CAPTIONS, with_reject_reason

OUTPUT_SCHEMA = with_reject_reason(CAPTIONS)


class CaptionOp:
    """Loads the captioner once (per Ray actor) and captions one batch per call."""

    def __init__(self, model: dict, caption: dict, s3: dict | None):
        self.captioner = Captioner(load_mllm_from_conf(model), caption["kv_cache"])
        self.model_name = model["name_or_path"]
        self.conf = caption
        self.s3 = s3

    def __call__(self, batch: dict) -> pa.Table:
        n = len(batch["image_id"])
        source = batch.get("source_caption")
        rows, images, ok = [], [], []
        for i in range(n):
            row = {"image_id": batch["image_id"][i], "sha256": batch["sha256"][i], "caption_long": None,
                   "caption_short": None, "caption_short_source": None, "model": self.model_name, "reject_reason": None}
            try:
                images.append(load_image(batch["uri"][i], self.s3, expected_sha256=batch["sha256"][i]))
                ok.append(i)
            except ImageRejected as e:
                row["reject_reason"] = str(e)
            rows.append(row)
        if ok:
            c = self.conf
            longs = self.captioner.caption(images, c["prompt_long"], c["max_new_tokens_long"])
            given = [source[i] if (source is not None and c["short_from_manifest"]) else None for i in ok]
            need = [j for j, g in enumerate(given) if not g]
            shorts = self.captioner.caption([images[j] for j in need], c["prompt_short"], c["max_new_tokens_short"]) if need else []
            generated = dict(zip(need, shorts))
            for j, i in enumerate(ok):
                rows[i]["caption_long"] = longs[j]
                rows[i]["caption_short"] = generated.get(j, given[j])
                rows[i]["caption_short_source"] = "model" if j in generated else "manifest"
        return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)


# -- the vLLM backend's pieces (caption.backend: vllm; pipelines/caption.py wires them
# around ray.data.llm). Plain functions of rows: no Ray, no vLLM here.
REQUEST_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("sha256", pa.string()),
    pa.field("kind", pa.string()),  # "long" or "short": which caption this request writes
    pa.field("prompt", pa.string()),
    pa.field("max_tokens", pa.int32()),
    pa.field("image_url", pa.string()),  # the decoded, checked image as a PNG data URL
    pa.field("source_caption", pa.string()),
    pa.field("reject_reason", pa.string()),
])


class CaptionRequestOp:
    """images rows -> one request row per caption to generate (long always, short unless
    the manifest's caption stands in), or one reject row for an unreadable image. The
    image is loaded and checked here (sha256, limits) as CaptionOp does, and travels as
    a PNG data URL, which vLLM's multimodal preparation reads."""

    def __init__(self, caption: dict, s3: dict | None):
        self.conf, self.s3 = caption, s3

    def __call__(self, batch: dict) -> pa.Table:
        import base64
        import io

        c, rows = self.conf, []
        source = batch.get("source_caption")
        for i in range(len(batch["image_id"])):
            base = {"image_id": batch["image_id"][i], "sha256": batch["sha256"][i],
                    "source_caption": source[i] if source is not None else None}
            try:
                image = load_image(batch["uri"][i], self.s3, expected_sha256=batch["sha256"][i])
            except ImageRejected as e:
                rows.append({**base, "kind": "long", "prompt": None, "max_tokens": 0, "image_url": None,
                             "reject_reason": str(e)})
                continue
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
            rows.append({**base, "kind": "long", "prompt": c["prompt_long"], "max_tokens": c["max_new_tokens_long"],
                         "image_url": url, "reject_reason": None})
            if not (c["short_from_manifest"] and base["source_caption"]):
                rows.append({**base, "kind": "short", "prompt": c["prompt_short"],
                             "max_tokens": c["max_new_tokens_short"], "image_url": url, "reject_reason": None})
        return pa.Table.from_pylist(rows, schema=REQUEST_SCHEMA)


def vllm_request(row: dict) -> dict:
    """A request row -> ray.data.llm's input: chat messages and greedy sampling (as the
    transformers backend decodes), the row's own columns carried through."""
    return dict(
        messages=[{"role": "user", "content": [{"type": "image", "image": row["image_url"]},
                                               {"type": "text", "text": row["prompt"]}]}],
        sampling_params=dict(temperature=0.0, max_tokens=int(row["max_tokens"])),
        image_id=row["image_id"], sha256=row["sha256"], kind=row["kind"], source_caption=row["source_caption"],
    )


def vllm_result(row: dict) -> dict:
    """ray.data.llm's output row -> (image_id, sha256, kind, text, source_caption, reject_reason)."""
    return dict(image_id=row["image_id"], sha256=row["sha256"], kind=row["kind"],
                text=(row.get("generated_text") or "").strip(), source_caption=row["source_caption"],
                reject_reason=None)


def captions_from_results(rows: list[dict], model_name: str) -> dict:
    """The results of one image (its long caption, its short one if generated, or its
    reject) -> its captions row, as CaptionOp writes it."""
    first = rows[0]
    row = {"image_id": first["image_id"], "sha256": first["sha256"], "caption_long": None, "caption_short": None,
           "caption_short_source": None, "model": model_name, "reject_reason": None}
    rejected = [r["reject_reason"] for r in rows if r.get("reject_reason")]
    if rejected:
        row["reject_reason"] = rejected[0]
        return row
    texts = {r["kind"]: r["text"] for r in rows}
    row["caption_long"] = texts.get("long")
    if "short" in texts:
        row["caption_short"], row["caption_short_source"] = texts["short"], "model"
    else:
        row["caption_short"], row["caption_short_source"] = first["source_caption"], "manifest"
    return row

