"""One table and one PNG of FD against NFE from `cmgen eval sweep` JSON files (CTM at gamma 0 and 1, with and
without the GAN stage), beside the teacher's best row and optional reference points (e.g. iCT's 1 and 2
steps from the README, measured with the same protocol).

    python benchmarks/ctm_nfe_table.py --out runs/ctm_nfe \\
        --sweep "CTM gamma=0=runs/ctm_digits/eval/sweep_FD-digits_step800.json" \\
        --sweep "CTM gamma=1=runs/ctm_digits/eval/sweep_FD-digits_multistep_step800.json" \\
        --teacher runs/edm_digits/eval/sweep_FD-digits_step3000.json --point "iCT (README)=1:3.496,2:1.9"
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows_of(path: str) -> list[dict]:
    return [r for r in json.loads(Path(path).read_text())["rows"] if isinstance(r.get("nfe"), int) and r["nfe"] > 0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="append", default=[], metavar="LABEL=JSON", help="a sweep to tabulate")
    ap.add_argument("--teacher", metavar="JSON", help="the teacher's sweep: its best row is shown")
    ap.add_argument("--point", action="append", default=[], metavar="LABEL=NFE:FD,...", help="reference points")
    ap.add_argument("--out", required=True, metavar="STEM", help="writes STEM.md and STEM.png")
    args = ap.parse_args()

    series = {}
    for item in args.sweep:
        label, _, path = item.rpartition("=")
        series[label] = {r["nfe"]: r["fd"] for r in rows_of(path)}
    for item in args.point:
        label, _, pts = item.partition("=")
        series[label] = {int(a): float(b) for a, b in (p.split(":") for p in pts.split(","))}
    nfes = sorted({n for s in series.values() for n in s})
    lines = ["| model | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
    for label, s in series.items():
        lines.append(f"| {label} | " + " | ".join(f"{s[n]:.3g}" if n in s else "" for n in nfes) + " |")
    best = None
    if args.teacher:
        best = min(rows_of(args.teacher), key=lambda r: r["fd"])
        lines.append(f"\nTeacher's best: FD {best['fd']:.3g} at NFE {best['nfe']} ({args.teacher}).")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, s in series.items():
        x = sorted(s)
        ax.plot(x, [s[n] for n in x], "o-" if len(x) > 2 else "s--", label=label)
    if best is not None:
        ax.axhline(best["fd"], color="k", ls="--", lw=1, label=f"teacher, NFE {best['nfe']} ({best['fd']:.3g})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(nfes, [str(n) for n in nfes])
    ax.set_xlabel("NFE")
    ax.set_ylabel("FD-digits (held-out digits)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
