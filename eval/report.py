"""Tables as JSON, Markdown and terminal text; PNG plots of a metric against NFE or training step."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from cmgen.eval.fid import Table


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, (int, str)):
        return str(v)
    return f"{v:.{digits}g}"


def columns(table: Table) -> list[tuple[str, callable]]:
    """(header, row -> text) pairs: FD first, then the sample-based metrics of the feature kind."""
    cols = [("steps", lambda r: _fmt(r.get("steps"))), ("NFE", lambda r: _fmt(r.get("nfe")))]
    if table.metric == "FD-points":
        cols += [("SWD", lambda r: _fmt(r.get("swd"))), ("MMD^2", lambda r: _fmt(r.get("mmd2"))),
                 (table.metric, lambda r: _fmt(r.get("fd")))]
    else:
        cols += [(table.metric, lambda r: _fmt(r.get("fd")))]
    cols += [("precision", lambda r: _fmt(r.get("precision"), 3)), ("recall", lambda r: _fmt(r.get("recall"), 3))]
    if table.metric != "FD-points":
        cols += [("KID x1e3", lambda r: "-" if r.get("kid") is None
                  else f"{1e3 * r['kid']:.3g} ± {1e3 * r['kid_std']:.2g}")]
    return cols


def protocol_lines(table: Table) -> list[str]:
    p = table.protocol
    ref = p.get("reference", {})
    ref_text = ref.get("name", "?") if isinstance(ref, dict) else str(ref)
    if isinstance(ref, dict) and ref.get("n"):
        ref_text += f" (n={ref['n']})"
    lines = [f"feature net: {p.get('features')} ({table.metric})" + (f", weights {p['weights']}" if p.get("weights") else ""),
             f"mode: {p.get('mode', 'n/a')}; n: {p.get('n')} samples per row; reference: {ref_text}"]
    if p.get("samples"):
        lines.append(f"samples: {p['samples']}" + (f", seed {p['seed']}" if "seed" in p else "")
                     + (f", sampler {p['sampler']}" if p.get("sampler") else "")
                     + (f", guidance {p['guidance']:g}" if p.get("guidance") else ""))
    sub = p.get("subsample")
    if sub:
        lines.append(f"precision/recall/KID: a seeded uniform draw (seed {sub['seed']}) of up to {sub['keep']} "
                     "feature rows per set; FD uses every sample")
    if p.get("warning"):
        lines.append(f"WARNING: {p['warning']}")
    return lines


def to_markdown(table: Table, title: str = "") -> str:
    cols = columns(table)
    out = [f"### {title}", ""] if title else []
    out.append("| " + " | ".join(h for h, _ in cols) + " |")
    out.append("|" + "|".join("---" for _ in cols) + "|")
    for r in table.rows:
        out.append("| " + " | ".join(f(r) for _, f in cols) + " |")
    out.append("")
    out += [f"- {line}" for line in protocol_lines(table)]
    return "\n".join(out) + "\n"


def to_text(table: Table) -> str:
    cols = columns(table)
    cells = [[h for h, _ in cols]] + [[f(r) for _, f in cols] for r in table.rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines + protocol_lines(table)) + "\n"


def to_json(table: Table) -> dict:
    return {"metric": table.metric, "protocol": table.protocol, "rows": table.rows}


def write_table(table: Table, out_dir, stem: str, title: str = "") -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    js.write_text(json.dumps(to_json(table), indent=2) + "\n")
    md.write_text(to_markdown(table, title))
    return [js, md]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def primary_key(metric: str) -> str:
    """The number plotted: SWD for points, the Frechet distance otherwise."""
    return "swd" if metric == "FD-points" else "fd"


def save_sweep_plot(table: Table, path) -> Optional[Path]:
    key = primary_key(table.metric)
    pts = [(r["nfe"], r[key]) for r in table.rows if r.get("nfe") and r.get(key) is not None]
    floor = [r[key] for r in table.rows if r.get("nfe") == 0 and r.get(key) is not None]  # the `real` row
    if not pts:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    x, y = zip(*sorted(pts))
    sampler = table.protocol.get("sampler")
    guidance = table.protocol.get("guidance")
    label = (sampler or "samples") + (f", cfg {guidance:g}" if guidance else "")
    ax.plot(x, y, "o-", label=label)
    if floor:
        ax.axhline(floor[0], color="k", ls="--", lw=1, label=f"real data ({floor[0]:.3g})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(x), [str(v) for v in x])
    ax.set_xlabel("NFE (network evaluations per sample)")
    ax.set_ylabel("SWD" if key == "swd" else table.metric)
    ax.set_yscale("log")
    ax.set_title(f"{table.metric if key == 'fd' else 'SWD'} vs NFE (n={table.protocol.get('n')})", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def save_step_curves(rows: list[dict], keys: list[str], path, ylabel: str, title: str) -> Optional[Path]:
    """One line per key (e.g. fd_1step, fd_2step) against the training step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    drawn = False
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None and math.isfinite(r[key])]
        if pts:
            s, v = zip(*pts)
            ax.plot(s, v, "o-", ms=3, label=key)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
