"""The report stage: report/report.md with the TinyR1-style table, the merge choice, whether the
method held (merge beats base, keeps the branches' gains), the verify funnels, SFT token lengths,
the training loss of every trained model, an accuracy dot plot and cost against accuracy (PNG
files next to it).

`build_report(run_dir, out)` does the work from a run directory alone, so the notebook and tests
use it without the pipeline; `table_from_report(path)` gives back the console table that
jobs/run.py prints at the end of a run.
"""

from __future__ import annotations

from pathlib import Path

from rdistill.report import inputs, plots
from rdistill.report.cost import cost_markdown, cost_summary
from rdistill.report.distill import distill_markdown
from rdistill.report.table import build_table, details_markdown, to_markdown, to_text
from rdistill.report.verdict import method_verdict, verdict_markdown
from rdistill.stage_api import Stage

TABLE_START, TABLE_END = "<!-- table:text -->", "<!-- /table:text -->"


def labels_for(run_dir: str | Path, models: list[str]) -> dict[str, str]:
    """Display names: the chosen merge is marked, the teacher and base carry their names, and
    students trained with offline logit KD (train.kd.weight > 0) carry `+kd`."""
    import json
    sel = inputs.selection(run_dir) or {}
    cfg_path = Path(run_dir) / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    out = {}
    models = list(dict.fromkeys(models))
    for m in models:
        if m == f"merge:{sel.get('candidate')}" and sum(x.startswith("merge:") for x in models) > 1:
            out[m] = f"{m} (chosen)"
        elif m == "teacher" and cfg.get("teacher", {}).get("name"):
            out[m] = f"teacher ({cfg['teacher']['name']})"
        elif m == "base" and cfg.get("student", {}).get("name"):
            out[m] = f"base ({cfg['student']['name']})"
        elif m == "mixture":
            out[m] = "mixture (all SFT sets)"
        if (cfg.get("train", {}).get("kd") or {}).get("weight", 0) > 0 and (m == "mixture" or m.startswith("branch:")):
            head, _, tail = out.get(m, m).partition(" ")
            out[m] = f"{head}+kd {tail}".strip()
    return out


def _funnel_md(funnels: dict[str, list[tuple[str, int]]]) -> str:
    parts = []
    for d, steps in funnels.items():
        parts.append(f"**{d}**\n\n| step | samples |\n|---|---:|\n"
                     + "\n".join(f"| {s} | {n} |" for s, n in steps))
    return "\n\n".join(parts) if parts else "(the verify stage recorded no funnel)"


def _selection_md(sel: dict | None, doms: list[str]) -> str:
    if not sel:
        return "(no merge selection recorded)"
    lines = [f"Chosen merge: **{sel['candidate']}** (`{sel['path']}`)"]
    scores = sel.get("scores") or {}
    if scores:
        seen = {d for s in scores.values() for d in (s.get("domains") or {})}
        doms = [d for d in doms if d in seen]
        lines += ["", f"Dev-split scores (pass@1 x 100, objective: {sel.get('objective', 'mean')}):", "",
                  "| candidate | " + " | ".join(doms) + " | objective |",
                  "|---|" + "---:|" * (len(doms) + 1)]
        for name, s in scores.items():
            per = s.get("domains") or {}
            lines.append(f"| {name} | " + " | ".join(f"{100 * per[d]:.1f}" if d in per else "-" for d in doms)
                         + f" | {100 * s['objective']:.1f} |")
    elif sel.get("note"):
        lines.append(f"({sel['note']})")
    return "\n".join(lines)


def _search_md(srch: dict | None, sel: dict | None, t) -> str:
    """The merge search: every candidate's dev score at the last rung it reached, the chosen
    recipe, and how far it is above the best fixed recipe on dev and on test."""
    if not srch:
        return "(no merge search in this run)"
    rungs = [r["dev_prompts_per_domain"] for r in srch["rungs"]]
    refined = srch.get("refined") or []
    also = (f", then {len(refined)} refinement candidate(s) on the whole dev split (the choice with one "
            f"branch's weight a step up or down)" if refined else "")
    lines = [f"Chosen: **{srch['chosen']}**, {srch['label']} (recipe: `merge/search/recipe.yaml`); "
             f"{len(srch['candidates']) - len(refined)} candidates, successive halving over {len(rungs)} rung(s) of "
             f"{', '.join(map(str, rungs))} dev prompts per domain{also}; {srch['engine_starts']} engine start(s), "
             f"{srch['seconds']:.0f} s.", "",
             ]
    domains = sorted({d for c in srch["candidates"] for s in (c.get("dev") or {}).values() for d in s})
    lines += ["| candidate | recipe | dev prompts | dev objective | " + " | ".join(domains) + " |",
              "|---|---|---:|---:|" + "---:|" * len(domains)]
    best: dict[str, tuple] = {}  # method -> (rung reached, objective, candidate): its best, as far as it got
    for c in sorted(srch["candidates"], key=lambda c: (-max(map(int, c["objective"])), -max(c["objective"].values()))):
        k = str(max(map(int, c["objective"])))
        mark = " (chosen)" if c["name"] == srch["chosen"] else ""
        whence = f" (refines {c['refined_from']})" if c.get("refined_from") else ""
        dev = (c.get("dev") or {}).get(k, {})
        cells = " | ".join(f"{100 * dev[d]:.1f}" if d in dev else "-" for d in domains)
        lines.append(f"| {c['name']}{mark} | {c['label']}{whence} | {k} | {100 * c['objective'][k]:.1f} | {cells} |")
        method = c["label"].split()[0]
        best[method] = max(best.get(method, (0, 0.0, "")), (int(k), c["objective"][k], c["name"]))
    lines += ["", "Best per method (the candidate that reached the furthest rung, then the best there): " + ", ".join(
        f"{m} {100 * o:.1f} ({n}, {k} prompts)" for m, (k, o, n) in
        sorted(best.items(), key=lambda kv: (-kv[1][0], -kv[1][1]))) + "."]
    fixed = [n for n in (sel or {}).get("scores", {}) if n != "search"]
    if fixed and "search" in (sel or {}).get("scores", {}):
        dev = sel["scores"]
        best = max(fixed, key=lambda n: dev[n]["objective"])
        gap_dev = dev["search"]["objective"] - dev[best]["objective"]
        test_s, test_b = t.value("merge:search", "mean"), t.value(f"merge:{best}", "mean")
        gap_test = "-" if None in (test_s, test_b) else f"{100 * (test_s - test_b):+.1f}"
        lines += ["", f"Against the best fixed recipe ({best}): {100 * gap_dev:+.1f} on dev (the evaluate "
                      f"stage's dev split), {gap_test} on test (mean pass@1 x 100)."]
    return "\n".join(lines)


def _unjudged(res: list[dict]) -> list[str]:
    """Samples left out of pass@1 because the verifier could not judge them, said out loud."""
    bad = [r for r in res if r.get("n_infra")]
    if not bad:
        return []
    return [f"**Not judged:** {sum(r['n_infra'] for r in bad)} sample(s) could not be scored (code sandbox "
            "failure or a machine too busy to run the program in time, on every retry) and are left out of "
            "pass@1: " + ", ".join(f"{r['model']}/{r['domain']}: {r['n_infra']}" for r in bad) + ".", ""]


def build_report(run_dir: str | Path, out: str | Path) -> dict:
    """Write report.md and its PNGs into `out` from the artifacts of `run_dir`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    res = inputs.results(run_dir)
    doms = inputs.domains(run_dir)
    models = [r["model"] for r in res]
    # columns: the branches' domains, then any extra test set (math/aime25) beside them
    extra = [d for d in dict.fromkeys(r["domain"] for r in res) if d not in doms]
    t = build_table(res, doms + extra, labels_for(run_dir, models))
    sel = inputs.selection(run_dir)
    merged = f"merge:{sel['candidate']}" if sel else next((m for m in t.rows if m.startswith("merge:")), None)
    verdict = method_verdict(res, doms, merged) if merged else None
    funnels = inputs.funnels(run_dir)
    lengths = inputs.sft_lengths(run_dir, doms)
    curves = inputs.loss_curves(run_dir, doms)
    compute = inputs.model_compute(run_dir, t.rows)
    styles = plots.model_styles(list(dict.fromkeys([*t.rows, *curves])), merged)  # a model looks alike in every plot
    pngs = {
        "accuracy": plots.accuracy_dots(t, out / "accuracy.png", merged, styles),
        "cost": plots.cost_accuracy(t, compute, out / "cost.png", merged, styles),
        "funnel": plots.funnel_bars(funnels, out / "funnel.png"),
        "sft_tokens": plots.token_histograms(lengths, out / "sft_tokens.png"),
        "loss": plots.loss_curves(curves, out / "loss.png", styles),
    }
    distill_md, pngs["distill_dev"] = distill_markdown(run_dir, res, doms, merged, out)
    n = sorted({r["n_samples"] for r in res})
    text = to_text(t)

    def img(key: str, alt: str) -> str:
        return f"![{alt}]({pngs[key].name})" if pngs[key] else f"({alt}: nothing to plot)"

    md = [
        f"# rdistill report: {Path(run_dir).absolute().name}", "",
        "## Results", "",
        f"pass@1 x 100 on each domain's test split, averaged over n = {', '.join(map(str, n))} samples "
        "per prompt; **bold**: best student model per column (the teacher is the reference).", "",
        to_markdown(t), "", *_unjudged(res),
        TABLE_START, "```text", text, "```", TABLE_END, "",
        "## Merge choice", "", _selection_md(sel, doms), "",
        "## Merge search", "", _search_md(inputs.search(run_dir), sel, t), "",
        "## Did the method hold?", "", verdict_markdown(verdict) if verdict else "(no merged model)", "",
        "## On-policy distillation from the branches", "", distill_md, "",
        *([img("distill_dev", "dev pass@1 per domain over the distill rounds"), ""] if pngs["distill_dev"] else []),
        "## Details", "", details_markdown(res, doms), "",
        img("accuracy", "accuracy per domain"), "",
        "## Verification funnel", "", _funnel_md(funnels), "", img("funnel", "verification funnel"), "",
        "## SFT data: completion lengths", "",
        " ".join(f"{d}: {len(v)} samples." for d, v in lengths.items()) or "(no SFT sets found)", "",
        img("sft_tokens", "completion token lengths of the kept SFT samples"), "",
        "## Training loss", "", img("loss", "training loss of the branches and the mixture baseline"), "",
        "## Cost", "", cost_markdown(run_dir, doms), "",
        "Compute to make each model from the student base (training; for a merge, its branches' training "
        "plus its merge) against its mean pass@1:", "", img("cost", "cost against accuracy"), "",
    ]
    (out / "report.md").write_text("\n".join(md))
    return {"table": text, "rows": len(t.rows), "domains": len(doms), "merged": merged, "compute_s": compute,
            "plots": sorted(k for k, v in pngs.items() if v),
            "method": verdict.to_dict() if verdict else None, "cost": cost_summary(run_dir)}


def table_from_report(path: str | Path) -> str | None:
    """The console table embedded in a report.md (None if the file or the table is missing)."""
    p = Path(path)
    if not p.exists():
        return None
    s = p.read_text()
    if TABLE_START not in s:
        return None
    body = s.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0]
    return body.replace("```text", "").replace("```", "").strip("\n")


def run(ctx) -> dict:
    return build_report(ctx.run.root, ctx.out)


# Reads only the artifacts of the stages before it.
STAGE = Stage("report", run, inputs=lambda c: ["evaluate", "verify", "train", "generate", "merge"]
              + (["distill"] if "distill" in c.stages else []))
