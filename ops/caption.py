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
