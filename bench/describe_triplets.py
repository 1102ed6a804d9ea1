"""Stage 2 on the describer's words: writes a copy of a triplets manifest whose
target_description is the describer's T~, written from (source image, instruction) with
the rank stage's template and length, as rank writes it for a query. Training Stage 2 on
that copy (catalogue.triplets=OUT) asks whether the adapter learns to correct the
describer with z_{r,Delta} when it meets the words it is sampled with.

    .venv/bin/python bench/describe_triplets.py TRIPLETS OUT [key=value ...]

TRIPLETS: a triplets manifest (runs/demo/catalogue/triplets.parquet after `make demo`);
the overrides are conf/demo.yaml's (models.describer, rank.describe_*).
"""
from __future__ import annotations

import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from model.mllm import Captioner, load_mllm_from_conf
from ops.images import load_image
from ops.rank import describe_targets
from pipelines.config import load_config, plain


def main(src: str, dst: str, overrides: list[str]) -> None:
    cfg = plain(load_config(["conf/demo.yaml"], overrides))
    r = cfg["rank"]
    describer = Captioner(load_mllm_from_conf(cfg["models"]["describer"]))
    table = pq.read_table(src)
    rows = table.to_pylist()
    written, t0 = [], time.monotonic()
    for i in tqdm(range(0, len(rows), r["batch_size"]), desc="describe triplets"):
        chunk = rows[i : i + r["batch_size"]]
        images = [load_image(x["source_uri"], cfg["storage"]["s3"], cfg["images"]["alpha_background"]) for x in chunk]
        edits = [x["instruction"] for x in chunk]
        written += describe_targets(describer, r, images, edits, [None] * len(chunk))
    exact = sum(w == x["target_description"] for w, x in zip(written, rows))
    col = table.schema.get_field_index("target_description")
    pq.write_table(table.set_column(col, "target_description", pa.array(written, pa.string())), dst)
    print(f"[describe_triplets] read {len(rows)}, written {len(written)} to {dst}, the true description "
          f"word for word {exact} ({100 * exact / max(len(rows), 1):.1f}%), in {time.monotonic() - t0:.1f}s")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
