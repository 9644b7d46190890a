"""report.md: a prepared dataset's manifest, for people (tables; no timings, so it is reproducible)."""

from __future__ import annotations


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def _pct(n: int, total: int) -> str:
    return f"{100.0 * n / total:.1f}%" if total else "-"


def render(m: dict) -> str:
    docs = m["documents"]
    lines = ["# Prepared dataset", "",
             f"Format `{m['format']}`: {docs['collected']} documents collected, **{docs['kept']} kept**, "
             f"{docs['removed']} removed. Tokenizer `{m['tokenizer']['kind']}` with {m['tokenizer']['vocab_size']} "
             f"ids (sha256 `{m['tokenizer']['sha256'][:16]}`).", "", "## Sources", ""]
    rows = []
    for name, s in m["sources"].items():
        skipped = ", ".join(f"{v} {k}" for k, v in s["skipped"].items()) or "none"
        rows.append([name, s["kind"], f"`{s['path']}`" if s["path"] else "-", s["files"], s["documents"],
                     f"{s['bytes'] / 1e6:.2f} MB", skipped])
    lines += _table(["source", "kind", "path", "files", "documents", "read", "skipped (not documents)"], rows)

    lines += ["", "## Removed", ""]
    removed = dict(m["cleaning"]["removed"])
    removed["exact duplicate"] = m["dedup"]["exact_removed"]
    removed["near duplicate"] = m["dedup"]["near_removed"]
    rows = [[reason, n, _pct(n, docs["collected"])] for reason, n in removed.items() if n]
    lines += _table(["reason", "documents", "of collected"], rows or [["none", 0, "-"]])
    if m["cleaning"]["pii_replacements"]:
        lines += ["", f"PII scrubbed: {m['cleaning']['pii_replacements']} emails/IP addresses replaced."]

    d = m["dedup"]
    lines += ["", "## Duplicates", "",
              f"{d['exact_groups']} groups of exact duplicates ({d['exact_duplicates']} extra copies); "
              f"{d['near_clusters']} near-duplicate clusters ({d['near_duplicates']} extra members)."]
    for title, clusters in (("Largest exact groups", d["largest_exact_groups"]),
                            ("Largest near-duplicate clusters", d["largest_near_clusters"])):
        if clusters:
            lines += ["", f"{title} (first = kept / representative):", ""]
            for c in clusters:
                shown = ", ".join(f"`{w}`" for w in c[:4]) + (f", ... ({len(c)} in all)" if len(c) > 4 else "")
                lines.append(f"- {shown}")

    lines += ["", "## Splits", ""]
    rows = []
    for name, s in m["splits"].items():
        bpt = f"{s['bytes'] / s['tokens']:.2f}" if s["tokens"] else "-"
        rows.append([name, s["documents"], s["tokens"], f"{s['bytes'] / 1e6:.2f} MB", bpt, len(s["shards"])])
    lines += _table(["split", "documents", "tokens", "bytes", "bytes/token", "shards"], rows)
    lines += ["", "Token shards hold one record per document (no <eos>; little-endian "
              f"`{m['token_dtype']}` ids). Load with `data.prepared.load_prepared(DIR)`.", ""]
    return "\n".join(lines)
