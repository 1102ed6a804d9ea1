"""Caption: a batch of `images` rows -> `captions` rows (long and short caption)."""
from __future__ import annotations

import pyarrow as pa

from model.mllm import Captioner, load_mllm_from_conf
from ops.base import ImageRowsOp
from ops.tables import TableReader
from ops.schemas import CAPTIONS, with_reject_reason

OUTPUT_SCHEMA = with_reject_reason(CAPTIONS)


class CaptionOp(ImageRowsOp):
    """Loads the captioner once (per Ray actor) and captions one batch per call: a long
    caption always, a short one unless the manifest's caption stands in for it."""

    schema = OUTPUT_SCHEMA

    def __init__(self, conf: dict, tables: TableReader | None):
        super().__init__(tables, conf["images"]["alpha_background"])
        model = conf["models"]["captioner"]
        self.captioner = Captioner(load_mllm_from_conf(model), conf["caption"]["kv_cache"])
        self.model_name = model["name_or_path"]
        self.conf = conf["caption"]

    def rejected(self, row: dict) -> list[dict]:
        return [self._row(row) | {"reject_reason": row["reject_reason"]}]

    def _row(self, row: dict) -> dict:
        return {"image_id": row["image_id"], "sha256": row["sha256"], "model": self.model_name}

    def compute(self, rows: list[dict], images: list[tuple]) -> list[dict]:
        c, first = self.conf, [im[0] for im in images]
        longs = self.captioner.caption(first, c["prompt_long"], c["max_new_tokens_long"])
        given = [r.get("source_caption") if c["short_from_manifest"] else None for r in rows]
        need = [j for j, g in enumerate(given) if not g]
        shorts = (
            self.captioner.caption([first[j] for j in need], c["prompt_short"], c["max_new_tokens_short"])
            if need
            else []
        )
        generated = dict(zip(need, shorts))
        return [
            self._row(r)
            | {
                "caption_long": longs[j],
                "caption_short": generated.get(j, given[j]),
                "caption_short_source": "model" if j in generated else "manifest",
            }
            for j, r in enumerate(rows)
        ]


# -- the vLLM backend's pieces (caption.backend: vllm; pipelines/caption.py wires them
# around ray.data.llm). Plain functions of rows: no Ray, no vLLM here.
REQUEST_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("sha256", pa.string()),
        pa.field("kind", pa.string()),  # "long" or "short": which caption this request writes
        pa.field("prompt", pa.string()),
        pa.field("max_tokens", pa.int32()),
        pa.field("image_url", pa.string()),  # the decoded, checked image as a PNG data URL
        pa.field("source_caption", pa.string()),
        pa.field("reject_reason", pa.string()),
    ]
)


class CaptionRequestOp(ImageRowsOp):
    """images rows -> one request row per caption to generate (long always, short unless
    the manifest's caption stands in), or one reject row for an unreadable image. The
    image is loaded and checked here (sha256, limits) as CaptionOp does, and travels as
    a PNG data URL, which vLLM's multimodal preparation reads."""

    schema = REQUEST_SCHEMA

    def __init__(self, conf: dict, tables: TableReader | None):
        super().__init__(tables, conf["images"]["alpha_background"])
        self.conf = conf["caption"]

    def rejected(self, row: dict) -> list[dict]:
        return [{**row, "kind": "long", "prompt": None, "max_tokens": 0, "image_url": None}]

    def compute(self, rows: list[dict], images: list[tuple]) -> list[dict]:
        import base64
        import io

        c, out = self.conf, []
        for row, (image,) in zip(rows, images):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            base = {
                "image_id": row["image_id"],
                "sha256": row["sha256"],
                "source_caption": row.get("source_caption"),
                "image_url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(),
            }
            out.append(
                {**base, "kind": "long", "prompt": c["prompt_long"], "max_tokens": c["max_new_tokens_long"]}
            )
            if not (c["short_from_manifest"] and base["source_caption"]):
                out.append(
                    {
                        **base,
                        "kind": "short",
                        "prompt": c["prompt_short"],
                        "max_tokens": c["max_new_tokens_short"],
                    }
                )
        return out


def vllm_request(row: dict) -> dict:
    """A request row -> ray.data.llm's input: chat messages and greedy sampling (as the
    transformers backend decodes), the row's own columns carried through."""
    return dict(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": row["image_url"]},
                    {"type": "text", "text": row["prompt"]},
                ],
            }
        ],
        sampling_params=dict(temperature=0.0, max_tokens=int(row["max_tokens"])),
        image_id=row["image_id"],
        sha256=row["sha256"],
        kind=row["kind"],
        source_caption=row["source_caption"],
    )


def vllm_result(row: dict) -> dict:
    """ray.data.llm's output row -> (image_id, sha256, kind, text, source_caption, reject_reason)."""
    return dict(
        image_id=row["image_id"],
        sha256=row["sha256"],
        kind=row["kind"],
        text=(row.get("generated_text") or "").strip(),
        source_caption=row["source_caption"],
        reject_reason=None,
    )


def captions_from_results(rows: list[dict], model_name: str) -> dict:
    """The results of one image (its long caption, its short one if generated, or its
    reject) -> its captions row, as CaptionOp writes it."""
    first = rows[0]
    row = {
        "image_id": first["image_id"],
        "sha256": first["sha256"],
        "caption_long": None,
        "caption_short": None,
        "caption_short_source": None,
        "model": model_name,
        "reject_reason": None,
    }
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
