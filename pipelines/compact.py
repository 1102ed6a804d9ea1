"""Stage `compact`: upkeep of the lake's Lance tables, so that a year of nightly commits
costs what one does.

Every commit adds fragments (and a merge_insert deletion files), and every version is
kept: after 365 nights of small commits a keyed lookup reads hundreds of fragments
(bench/compact_speed.py measures it). For each table with more than
`compact.min_fragments` fragments this stage rewrites them into fragments of
`compact.target_rows_per_fragment` rows (deleted rows dropped), folds new rows into its
scalar indices, and removes the versions older than `compact.keep_versions_days` (the
`index` stage refreshes the vector index). Contents are unchanged: only the layout.
"""
from __future__ import annotations

import datetime as dt

from pipelines.context import RunContext, Summary


def run(ctx: RunContext) -> Summary:
    c, lake = ctx.cfg.compact, ctx.lake
    summary = Summary("compact")
    fragments_before = fragments_after = versions_removed = bytes_removed = 0
    for name in c.tables:
        ds = lake.open(name)
        if ds is None:
            continue
        summary.read += 1
        before = len(ds.get_fragments())
        fragments_before += before
        if ctx.dry_run:
            summary.written += before > c.min_fragments
            continue
        if before > c.min_fragments:
            ds.optimize.compact_files(target_rows_per_fragment=c.target_rows_per_fragment,
                                      materialize_deletions=True)
            ds = lake.open(name)
            ds.optimize.optimize_indices()
            ds = lake.open(name)
            summary.written += 1
        else:
            summary.skipped += 1
        fragments_after += len(ds.get_fragments())
        stats = ds.cleanup_old_versions(older_than=dt.timedelta(days=c.keep_versions_days))
        versions_removed += stats.old_versions
        bytes_removed += stats.bytes_removed
    summary.extra.update(fragments_before=fragments_before, fragments_after=fragments_after,
                         versions_removed=versions_removed, kib_removed=round(bytes_removed / 1024))
    if ctx.dry_run:
        summary.note = f"dry run: {summary.written} of {summary.read} tables would be compacted"
    return summary
