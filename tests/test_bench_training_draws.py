"""bench/training_draws.py on a hand-made run folder whose draws are already benchmarked:
each draw's row, the modes' means and ranges and the Table 3 gaps on every draw."""
import json
import os

import pytest

from bench.training_draws import main, overrides, summary

pytestmark = pytest.mark.fast


def _table(full, query_only, prior_only, joint=40.0):
    return {m: {"R@1": v, "R@10": v + 50.0, "R@50": 99.0}
            for m, v in (("full", full), ("query_only", query_only), ("prior_only", prior_only), ("joint", joint))}


def _write_tables(run_dir, **tables):
    """Each table as the benchmark writes it, <run_dir>/<folder>/results.json."""
    for name, t in tables.items():
        os.makedirs(run_dir / name)
        (run_dir / name / "results.json").write_text(json.dumps(t))


def test_gaps_on_every_draw_and_the_modes_spread():
    s = summary({"own": _table(25.0, 20.0, 12.0), "s1": _table(22.0, 20.0, 21.0)})
    assert s["gaps"]["full - query_only R@1"] == {"values": [5.0, 2.0], "mean": 3.5, "min": 2.0, "max": 5.0}
    assert s["gaps"]["query_only - prior_only R@1"]["values"] == [8.0, -1.0]
    assert s["modes"]["prior_only R@10"] == {"values": [62.0, 71.0], "mean": 66.5, "min": 62.0, "max": 71.0}


def test_reads_the_demos_table_and_each_seeds_without_training_again(tmp_path, capsys):
    _write_tables(tmp_path, eval=_table(25.0, 20.0, 12.0), eval_s4=_table(21.0, 20.0, 19.5))
    assert main([str(tmp_path), "4"]) == 0
    out = capsys.readouterr().out
    assert "train.seed=4: full 21.0/71.0, query_only 20.0/70.0, prior_only 19.5/69.5" in out
    record = json.loads(out.strip().splitlines()[-1])
    assert record["draws"] == ["the run's seed", "train.seed=4"]
    assert record["gaps"]["query_only - prior_only R@1"]["values"] == [8.0, 0.5]


def test_a_folder_without_a_demo_table_is_refused_by_name(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert f"no demo table at {tmp_path}/eval/results.json" in capsys.readouterr().out


def test_each_seed_trains_under_its_own_names_and_absolute_model_folders():
    o = overrides("/r", 7)
    assert "train.seed=7" in o and "train_stage1.run_name=stage1_s7" in o
    assert "train_stage2.output=/r/lake/models/adapter_s7" in o


def test_a_tagged_variant_keeps_its_folders_apart_and_can_keep_the_demos_prior():
    o = overrides("/r", 2, tag="ema", stage2_only=True, extra=("seed=1", "train_stage2.ema_decay=0.99"))
    assert "seed=1" in o and "train_stage2.ema_decay=0.99" in o and "train.seed=2" in o
    assert "train_stage2.run_name=stage2_ema_s2" in o and "train_stage2.output=/r/lake/models/adapter_ema_s2" in o
    assert not any(a.startswith("train_stage1.") for a in o), "Stage 2 alone keeps the demo's Stage 1 prior"
    assert "train_stage1.output=/r/lake/models/prior_ema_s2" in overrides("/r", 2, tag="ema")


def test_a_tagged_variants_spread_leaves_the_demos_own_table_out(tmp_path, capsys):
    _write_tables(tmp_path, eval=_table(25.0, 20.0, 12.0), eval_ema_s0=_table(27.0, 20.0, 12.0),
                  eval_ema_s1=_table(29.0, 20.0, 12.0))
    assert main([str(tmp_path), "0", "1", "--tag", "ema", "train_stage2.ema_decay=0.99"]) == 0
    out = capsys.readouterr().out
    assert "the demo's own table (baseline): full 25.0/75.0" in out
    record = json.loads(out.strip().splitlines()[-1])
    assert record["draws"] == ["train.seed=0", "train.seed=1"]
    assert record["gaps"]["full - query_only R@1"]["values"] == [7.0, 9.0]


def test_seeds_that_are_not_integers_are_refused(tmp_path, capsys):
    assert main([str(tmp_path), "one"]) == 2
    assert "seeds are integers" in capsys.readouterr().out
