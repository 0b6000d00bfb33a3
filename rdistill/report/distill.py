"""The report's section on the distill stage: the merge+distill row against the merge and the
mixture, the stage's cost beside the mixture's training, and dev pass@1 over the rounds."""

from __future__ import annotations

import json
from pathlib import Path

from rdistill.report import plots

ROW = "merge+distill"  # rdistill.refs.DISTILLED_ROW (the report reads only the run directory)


def _json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def cost(run_dir: str | Path) -> dict:
    """The distill stage's wall time and its parts, and the mixture's training time."""
    run = Path(run_dir)
    d = (_json(run / "distill" / "manifest.json") or {})
    t = ((_json(run / "train" / "manifest.json") or {}).get("result") or {}).get("per_branch") or {}
    mix = t.get("mixture") or {}
    return {"distill_wall_s": d.get("wall_time_s"), "distill_update_s": (d.get("result") or {}).get("update_s"),
            "mixture_train_s": mix.get("train_time_s"), "mixture_wall_s": mix.get("wall_s")}


def _cell(res: dict, model: str, dom: str) -> str:
    r = res.get((model, dom))
    return "-" if r is None else f"{100 * r['pass_at_1']:.1f} ± {100 * (r.get('stderr') or 0):.1f}"


def distill_markdown(run_dir: str | Path, results: list[dict], domains: list[str], merged: str | None,
                     out: Path) -> tuple[str, Path | None]:
    """The section's markdown and its plot (None: the run has no distill stage)."""
    run = Path(run_dir)
    rounds = _json(run / "distill" / "rounds.json")
    if rounds is None:
        return "(no distill stage in this run)", None
    png = plots.dev_curve(rounds.get("dev_curve") or [], out / "distill_dev.png")
    res = {(r["model"], r["domain"]): r for r in results}
    rows = [m for m in (merged, ROW, "mixture") if m and any((m, d) in res for d in domains)]
    lines = [f"{len(rounds['rounds'])} round(s) of on-policy distillation of `{rounds['student']}` from "
             + ", ".join(f"{d}: `{p}`" for d, p in rounds["teachers"].items())
             + (f" (loss `{rounds['loss']}`)." if rounds.get("loss") else "."), "",
             *([f"The student was merge:{rounds['merge_choice']['candidate']}, the best merge on dev when the "
                "stage ran (before evaluate's choice)."] if rounds.get("merge_choice") else []), "",
             "| model | " + " | ".join(domains) + " |", "|---|" + "---:|" * len(domains)]
    lines += [f"| {m} | " + " | ".join(_cell(res, m, d) for d in domains) + " |" for m in rows]
    lines += ["", "| round | samples | " + " | ".join(f"{d} reverse KL/token" for d in domains)
              + " | sample+score s | update s |", "|---|---:|" + "---:|" * (len(domains) + 2)]
    for r in rounds["rounds"]:
        kl = r["data"]["domains"]
        lines.append(f"| {r['round']} | {r['data']['samples']} | "
                     + " | ".join(str((kl.get(d) or {}).get("reverse_kl_per_token", "-")) for d in domains)
                     + f" | {r['data'].get('sample_score_s', '-')} | {r.get('update_s', '-')} |")
    c = cost(run_dir)
    if c["distill_wall_s"] is not None:
        mix = (f"; the mixture baseline trained for {c['mixture_train_s']:.0f} s ({c['mixture_wall_s']:.0f} s wall), "
               f"so distilling cost {c['distill_wall_s'] / c['mixture_wall_s']:.2f}x the mixture's wall time"
               if c["mixture_wall_s"] else "")
        lines += ["", f"Cost: the distill stage took {c['distill_wall_s']:.0f} s wall, "
                      f"{c['distill_update_s'] or 0:.0f} s of it in the updates{mix}."]
    return "\n".join(lines), png
