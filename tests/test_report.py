"""The report stage on a hand-made run directory: table numbers, best marks, verdict, funnels,
plots that load back, the console table jobs/run.py prints, and the analysis notebook."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rdistill.report.stage import build_report, table_from_report
from rdistill.report.table import build_table, to_markdown, to_text
from rdistill.report.verdict import method_verdict

REPO = Path(__file__).resolve().parent.parent
DOMS = ["math", "code", "science"]
SCORES = {  # pass@1 per model and domain
    "base": [0.20, 0.10, 0.30],
    "branch:math": [0.80, 0.05, 0.25],
    "branch:code": [0.15, 0.60, 0.30],
    "branch:science": [0.20, 0.10, 0.70],
    "merge:fusion": [0.70, 0.50, 0.60],
    "merge:ties": [0.50, 0.40, 0.50],
    "teacher": [0.95, 0.90, 0.92],
}


def _results():
    return [{"model": m, "domain": d, "n_prompts": 100, "n_samples": 4, "pass_at_1": v,
             "stderr": 0.03, "n_errors": 0}
            for m, vals in SCORES.items() for d, v in zip(DOMS, vals)]


@pytest.fixture
def run_dir(tmp_path):
    def dump(rel, obj):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(obj))
    dump("config.json", {"domains": {d: {} for d in DOMS}, "teacher": {"name": "toy-teacher"},
                         "student": {"name": "toy-student"}})
    # shuffled on purpose: the table orders rows itself
    dump("evaluate/results.json", list(reversed(_results())))
    dump("evaluate/selection.json", {
        "candidate": "fusion", "path": "merge/fusion/final", "objective": "mean",
        "scores": {"fusion": {"domains": {"math": 0.7, "code": 0.5, "science": 0.6}, "objective": 0.6},
                   "ties": {"domains": {"math": 0.5, "code": 0.4, "science": 0.5}, "objective": 0.4667}}})
    dump("verify/manifest.json", {"result": {"funnel": {
        d: [["generated", 400], ["complete", 380], ["formatted", 370], ["correct", 300 + i], ["kept", 290 + i]]
        for i, d in enumerate(DOMS)}}})
    for i, d in enumerate(DOMS):
        rows = [{"messages": [], "completion_tokens": 20 + 5 * i + k % 7} for k in range(50)]
        (tmp_path / "verify" / f"{d}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        (tmp_path / "train" / d).mkdir(parents=True)
        (tmp_path / "train" / d / "metrics.jsonl").write_text(
            "\n".join(json.dumps({"step": s, "loss": 3.0 / (1 + s)}) for s in range(1, 21)))
    return tmp_path


def test_table_marks_best_student_and_computes_mean():
    t = build_table(_results(), DOMS)
    assert t.rows == ["base", "branch:math", "branch:code", "branch:science", "merge:fusion",
                      "merge:ties", "teacher"]
    assert t.value("merge:fusion", "mean") == pytest.approx(0.6)
    md = to_markdown(t)
    fusion = next(line for line in md.splitlines() if line.startswith("| merge:fusion"))
    assert fusion == "| merge:fusion | 70.0 | 50.0 | 60.0 | **60.0** |"
    teacher = next(line for line in md.splitlines() if line.startswith("| teacher"))
    assert "**" not in teacher  # the teacher is the reference, never marked
    assert "| branch:math | **80.0** |" in md
    text = to_text(t)
    assert "80.0*" in text and "95.0*" not in text


def test_method_verdict_against_hand_computation():
    v = method_verdict(_results(), DOMS, "merge:fusion")
    assert v.domains["math"]["kept"] == pytest.approx((0.70 - 0.20) / (0.80 - 0.20))
    assert v.domains["code"]["kept"] == pytest.approx(0.40 / 0.50)
    assert v.domains["science"]["kept"] == pytest.approx(0.30 / 0.40)
    # delta method: sqrt(se_m^2 + kept^2 se_br^2 + (kept - 1)^2 se_b^2) / gain
    assert v.domains["science"]["kept_se"] == pytest.approx(0.03 * (1 + 0.75 ** 2 + 0.25 ** 2) ** 0.5 / 0.40)
    assert "science: 75% ± 10%" in v.claims[2][2]
    se = (0.03 ** 2 * 2) ** 0.5  # two rows' errors combined
    assert v.domains["science"]["merge_z"] == pytest.approx(round(0.30 / se, 2))
    assert v.means["merge:fusion"].value == pytest.approx(0.6)
    assert v.means["merge:fusion"].se == pytest.approx((3 * 0.03 ** 2) ** 0.5 / 3)
    claims = {c: ok for c, ok, _ in v.claims}
    assert list(claims.values()) == [True, True, True, True] and v.held
    # the same run with a merge that keeps too little of the code branch's gain: said plainly
    worse = [dict(r, pass_at_1=0.12) if (r["model"], r["domain"]) == ("merge:fusion", "code") else r
             for r in _results()]
    w = method_verdict(worse, DOMS, "merge:fusion")
    assert not w.held and [ok for _, ok, _ in w.claims] == [True, False, False, True]


def test_kept_standard_error_matches_simulated_evaluations():
    """The delta-method error of the gain kept against the spread of the ratio over simulated
    evaluations (200 binomial samples per row, the toy's test size)."""
    import numpy as np
    from rdistill.report.verdict import Score, kept_se
    rng = np.random.default_rng(0)
    n, p = 200, {"base": 0.56, "branch": 0.90, "merged": 0.82}
    draws = {k: rng.binomial(n, q, size=20000) / n for k, q in p.items()}
    sim = (draws["merged"] - draws["base"]) / (draws["branch"] - draws["base"])
    s = {k: Score(q, (q * (1 - q) / n) ** 0.5) for k, q in p.items()}
    k = (p["merged"] - p["base"]) / (p["branch"] - p["base"])
    assert kept_se(s["base"], s["branch"], s["merged"], k) == pytest.approx(float(np.std(sim)), rel=0.1)


def test_verdict_compares_with_the_mixture_baseline():
    from rdistill.report.verdict import mixture_line
    res = _results() + [{"model": "mixture", "domain": d, "n_prompts": 100, "n_samples": 4,
                         "pass_at_1": p, "stderr": 0.03} for d, p in zip(DOMS, [0.6, 0.45, 0.5])]
    line = mixture_line(method_verdict(res, DOMS, "merge:fusion"))
    assert "the merge's mean 60.0 is above the mixture's 51.7" in line
    assert mixture_line(method_verdict(_results(), DOMS, "merge:fusion")).startswith("No data-mixture")


def test_build_report_writes_markdown_and_loadable_plots(run_dir, tmp_path):
    import matplotlib.image as mpimg
    out = tmp_path / "report_out"
    res = build_report(run_dir, out)
    md = (out / "report.md").read_text()
    assert "| merge:fusion (chosen) | 70.0 | 50.0 | 60.0 | **60.0** |" in md
    assert "| teacher (toy-teacher) | 95.0 | 90.0 | 92.0 |" in md
    assert "| ties | 50.0 | 40.0 | 50.0 | 46.7 |" in md  # every candidate's dev scores
    assert "| correct | 302 |" in md  # science funnel
    science = md.split("**science**")[1]
    assert science.index("| generated |") < science.index("| complete |") < science.index("| kept |")  # pipeline order
    assert "**The method held on this run.**" in md
    assert res["method"]["held"] and len(res["method"]["claims"]) == 4
    assert res["plots"] == ["accuracy", "funnel", "loss", "sft_tokens"]
    for name in ("accuracy", "funnel", "loss", "sft_tokens"):
        assert f"]({name}.png)" in md
        img = mpimg.imread(out / f"{name}.png")
        assert img.shape[0] > 100 and img.shape[1] > 100
    printed = table_from_report(out / "report.md")
    assert printed == res["table"]
    assert printed.splitlines()[0].split() == ["model"] + DOMS + ["mean"]
    assert len(printed.splitlines()) == 2 + len(SCORES)


def test_report_without_results_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the evaluate stage first"):
        build_report(tmp_path, tmp_path / "out")
    assert table_from_report(tmp_path / "missing.md") is None


def test_notebook_shows_the_same_table(run_dir, tmp_path, monkeypatch, capsys):
    """Runs the notebook's code cells in order (as a kernel would) against the run directory."""
    nb = json.loads((REPO / "notebooks" / "analyze_run.ipynb").read_text())
    monkeypatch.setenv("RDISTILL_RUN_DIR", str(run_dir))
    monkeypatch.setenv("RDISTILL_FIG_DIR", str(tmp_path / "figs"))  # the plots go to the test's folder
    (tmp_path / "figs").mkdir()
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "analyze_run.ipynb", "exec"), ns)
    shown = capsys.readouterr().out
    assert to_text(ns["table"]) in shown
    assert ns["table"].value("merge:fusion", "mean") == pytest.approx(0.6)
    assert (tmp_path / "figs" / "accuracy.png").exists()


def test_report_shows_the_search_and_its_margin_over_the_fixed_recipes(run_dir, tmp_path):
    res = json.loads((run_dir / "evaluate" / "results.json").read_text())
    res += [{"model": "merge:search", "domain": d, "n_prompts": 100, "n_samples": 4, "pass_at_1": p,
             "stderr": 0.03, "n_errors": 0} for d, p in zip(DOMS, [0.72, 0.55, 0.62])]
    (run_dir / "evaluate" / "results.json").write_text(json.dumps(res))
    sel = json.loads((run_dir / "evaluate" / "selection.json").read_text())
    sel["scores"]["search"] = {"domains": {"math": 0.75, "code": 0.55, "science": 0.6}, "objective": 0.6333}
    sel.update(candidate="search", path="merge/search/final")
    (run_dir / "evaluate" / "selection.json").write_text(json.dumps(sel))
    dev_of = {"c00": {"10": {"code": 0.3, "math": 0.5, "science": 0.4}},
              "c03": {"10": {"code": 0.5, "math": 0.7, "science": 0.6}, "30": {"code": 0.6, "math": 0.7, "science": 0.6}}}
    cand = lambda name, label, obj: {"name": name, "label": label, "steps": [], "out_at_rung": None,  # noqa: E731
                                     "dev": dev_of.get(name, {}), "objective": obj}
    (run_dir / "merge").mkdir()
    (run_dir / "merge" / "search.json").write_text(json.dumps({
        "chosen": "c03", "label": "task_arithmetic w=0.7/0.85/1", "objective": "mean", "engine_starts": 2,
        "seconds": 100, "rungs": [{"dev_prompts_per_domain": 10, "candidates": 2}, {"dev_prompts_per_domain": 30, "candidates": 1}],
        "refined": ["r00"],
        "candidates": [cand("c00", "linear (equal weights)", {"10": 0.4}),
                       cand("c03", "task_arithmetic w=0.7/0.85/1", {"10": 0.6, "30": 0.63}),
                       dict(cand("r00", "task_arithmetic w=0.85/0.85/1", {"30": 0.61}), refined_from="c03")]}))
    md = (tmp_path / "r" / "report.md") if build_report(run_dir, tmp_path / "r") else None
    text = md.read_text()
    assert "Chosen: **c03**, task_arithmetic w=0.7/0.85/1" in text
    # each candidate's dev score per domain at the last rung it reached
    assert "| candidate | recipe | dev prompts | dev objective | code | math | science |" in text
    assert "| c03 (chosen) | task_arithmetic w=0.7/0.85/1 | 30 | 63.0 | 60.0 | 70.0 | 60.0 |" in text
    assert "| c00 | linear (equal weights) | 10 | 40.0 | 30.0 | 50.0 | 40.0 |" in text
    assert "| r00 | task_arithmetic w=0.85/0.85/1 (refines c03) | 30 | 61.0 | - | - | - |" in text
    assert "Best per method (the candidate that reached the furthest rung, then the best there): " \
           "task_arithmetic 63.0 (c03, 30 prompts), linear 40.0 (c00, 10 prompts)." in text
    assert ("2 candidates, successive halving over 2 rung(s) of 10, 30 dev prompts per domain, then 1 "
            "refinement candidate(s)") in text
    # dev: 63.3 vs fusion's 60.0; test mean: 63.0 vs fusion's 60.0
    assert "Against the best fixed recipe (fusion): +3.3 on dev (the evaluate stage's dev split), +3.0 on test" in text
    assert "| merge:search (chosen) |" in text


def test_distill_section_rows_cost_and_dev_curve(run_dir):
    from PIL import Image
    res = _results() + [{"model": "merge+distill", "domain": d, "n_prompts": 100, "n_samples": 4, "pass_at_1": v,
                         "stderr": 0.03, "n_errors": 0} for d, v in zip(DOMS, [0.78, 0.58, 0.69])]
    (run_dir / "evaluate" / "results.json").write_text(json.dumps(res))
    (run_dir / "train" / "manifest.json").write_text(json.dumps(
        {"result": {"per_branch": {"mixture": {"train_time_s": 100.0, "wall_s": 130.0}}}}))
    curve = [{"round": r, "dev": {d: {"pass_at_1": 0.5 + 0.1 * r, "stderr": 0.05, "n_prompts": 40} for d in DOMS}}
             for r in range(3)]
    rounds = [{"round": r, "update_s": 10.0, "data": {"samples": 64, "sample_score_s": 5.0, "domains": {
        d: {"reverse_kl_per_token": 0.3 / r} for d in DOMS}}} for r in (1, 2)]
    (run_dir / "distill").mkdir()
    (run_dir / "distill" / "rounds.json").write_text(json.dumps(
        {"student": "merged", "teachers": {d: f"branch:{d}" for d in DOMS}, "loss": "topk_kl", "rounds": rounds,
         "dev_curve": curve}))
    (run_dir / "distill" / "manifest.json").write_text(json.dumps({"wall_time_s": 52.0,
                                                                   "result": {"update_s": 20.0}}))
    out = run_dir / "report"
    info = build_report(run_dir, out)
    md = (out / "report.md").read_text()
    sec = md.split("## On-policy distillation from the branches")[1].split("\n## ")[0]
    assert "| merge:fusion | 70.0 ± 3.0 | 50.0 ± 3.0 | 60.0 ± 3.0 |" in sec
    assert "| merge+distill | 78.0 ± 3.0 | 58.0 ± 3.0 | 69.0 ± 3.0 |" in sec
    assert "| 2 | 64 | 0.15 | 0.15 | 0.15 | 5.0 | 10.0 |" in sec
    assert "(loss `topk_kl`)." in sec
    assert "took 52 s wall, 20 s of it in the updates; the mixture baseline trained for 100 s (130 s wall), " \
           "so distilling cost 0.40x the mixture's wall time" in sec
    assert "distill_dev" in info["plots"] and Image.open(out / "distill_dev.png").size[0] > 100
    # the table puts merge+distill after the merges, before the teacher
    table = md.split("## Results")[1].split("\n\n")[2]
    rows = [ln.split("|")[1].strip() for ln in table.split("\n") if ln.startswith("| ")][2:]
    assert rows[-2:] == ["merge+distill", "teacher (toy-teacher)"], rows


@pytest.fixture
def full_run(tmp_path):
    """A run with a real run's 11 models (tests/report_run.py)."""
    import report_run
    return report_run.write(tmp_path / "run")


def _points(ax) -> dict[str, tuple]:
    """{model: (colour, marker, size)} of the errorbar artists of one panel."""
    from matplotlib.container import ErrorbarContainer
    out = {}
    for c in ax.containers:
        assert isinstance(c, ErrorbarContainer)
        line = c.lines[0]
        assert line.get_gid() not in out  # one artist per model
        out[line.get_gid()] = (line.get_color(), line.get_marker(), line.get_markersize())
    return out


def test_accuracy_dot_plot_tells_every_model_apart(full_run):
    import report_run
    from rdistill.report import plots
    t = build_table(report_run.results(), report_run.DOMS)
    fig = plots.accuracy_figure(t, chosen="merge:search")
    assert [ax.get_title() for ax in fig.axes] == report_run.DOMS + ["mean"]
    for ax in fig.axes:  # every panel: one point per model, each its own colour and its own marker
        pts = _points(ax)
        assert set(pts) == set(report_run.TABLE)
        assert len({c for c, _, _ in pts.values()}) == len(pts) and len({m for _, m, _ in pts.values()}) == len(pts)
        big = {m for m, (_, _, size) in pts.items() if size > 7}
        assert big == {"merge:search", "mixture"}  # the chosen merge and the mixture stand out
    # each point at its pass@1 with the standard error as its bar
    c = next(c for c in fig.axes[0].containers if c.lines[0].get_gid() == "merge:ties")
    assert c.lines[0].get_xdata()[0] == pytest.approx(90.5)
    seg = c.lines[2][0].get_segments()[0]
    assert seg[1][0] - seg[0][0] == pytest.approx(2 * 100 * math.sqrt(0.905 * 0.095 / 200), rel=1e-2)
    # rows grouped by kind, in this order, top to bottom
    labels = [tick.get_text() for tick in fig.axes[0].get_yticklabels()]
    kinds = [plots.kind_of(m) for m in t.rows]
    assert kinds == sorted(kinds, key=["base", "branch", "merge", "baseline", "teacher"].index)
    assert labels[-1] == "teacher" and "mixture" in labels


def test_loss_plot_draws_every_trained_model_raw_and_smoothed(full_run):
    import numpy as np

    from rdistill.report import inputs, plots
    curves = inputs.loss_curves(full_run, ["code", "math", "science"])
    assert list(curves) == ["branch:code", "branch:math", "branch:science", "mixture"]
    assert len(curves["mixture"]) == 450 and len(curves["branch:math"]) == 150
    lines = {line.get_gid(): line for line in plots.loss_figure(curves).axes[0].get_lines()}
    for m, pts in curves.items():
        raw, smooth = lines[f"{m} raw"], lines[f"{m} smoothed"]
        assert list(raw.get_ydata()) == [y for _, y in pts]  # the raw curve is the data itself
        assert raw.get_alpha() < 0.5 and smooth.get_alpha() in (None, 1) and raw.get_color() == smooth.get_color()
        y = np.asarray(smooth.get_ydata())  # smoothed: far less step-to-step noise, same level
        assert np.std(np.diff(y)) < 0.3 * np.std(np.diff(raw.get_ydata()))
        assert y[-20:].mean() == pytest.approx(np.mean([v for _, v in pts][-20:]), rel=0.2)


def test_cost_plot_puts_each_model_at_its_compute(full_run):
    import report_run
    from rdistill.report import inputs, plots
    t = build_table(report_run.results(), report_run.DOMS)
    compute = inputs.model_compute(full_run, t.rows)
    branches = 2 * (61.2 + 58.4 + 63.0)  # training time x 2 workers, each
    assert compute["base"] == 0 and compute["branch:code"] == pytest.approx(2 * 61.2)
    assert compute["mixture"] == pytest.approx(2 * 180.5)
    assert compute["merge:fusion"] == pytest.approx(branches + 1.9 + 2.1)
    assert compute["merge:search"] == pytest.approx(branches + 139.0)
    assert "teacher" not in compute  # nothing records what the teacher cost
    ax = plots.cost_figure(t, compute, chosen="merge:search").axes[0]
    pts = _points(ax)
    assert set(pts) == set(report_run.TABLE) - {"teacher"}
    assert len({(c, m) for c, m, _ in pts.values()}) == len(pts)
    search = next(c for c in ax.containers if c.lines[0].get_gid() == "merge:search").lines[0]
    assert search.get_ydata()[0] == pytest.approx((97.5 + 97.0 + 87.0) / 3)
    assert search.get_xdata()[0] == pytest.approx(branches + 139.0)
    assert [line.get_ydata()[0] for line in ax.get_lines() if line.get_gid() == "teacher"] == \
        [pytest.approx((100 + 100 + 98.5) / 3)]  # the teacher: a line across


def test_compute_reads_a_recorded_compute_s_first(full_run):
    from rdistill.report.inputs import compute_s, model_compute
    assert compute_s({"compute_s": 500.0, "train_time_s": 10, "workers": 2}) == 500.0
    assert compute_s({"train_time_s": 10, "workers": 4}) == 40.0
    assert compute_s({"seconds": 3.5}) == 3.5 and compute_s({}) is None
    man = json.loads((full_run / "train" / "manifest.json").read_text())
    man["result"]["per_branch"]["code"]["compute_s"] = 1000.0
    (full_run / "train" / "manifest.json").write_text(json.dumps(man))
    got = model_compute(full_run, ["branch:code", "merge:ties"])
    assert got["branch:code"] == 1000.0
    assert got["merge:ties"] == pytest.approx(1000.0 + 2 * (58.4 + 63.0) + 2.2)


def test_report_of_a_full_run_has_the_three_plots(full_run, tmp_path):
    import matplotlib.image as mpimg
    res = build_report(full_run, tmp_path / "out")
    assert res["plots"] == ["accuracy", "cost", "funnel", "loss", "sft_tokens"]
    md = (tmp_path / "out" / "report.md").read_text()
    for name in ("accuracy", "cost", "loss"):
        assert f"]({name}.png)" in md
        assert min(mpimg.imread(tmp_path / "out" / f"{name}.png").shape[:2]) > 300


def test_equal_scores_without_spread_differ_by_zero_standard_errors():
    """Merge and mixture both at 100% (standard error 0) are equal: 0 se, not -inf (seen in a run)."""
    from rdistill.report.verdict import Score
    assert Score(1.0, 0.0).minus(Score(1.0, 0.0)).z == 0.0
    assert Score(1.0, 0.0).minus(Score(0.9, 0.0)).z == float("inf")
    assert Score(0.9, 0.0).minus(Score(1.0, 0.0)).z == float("-inf")
    assert abs(Score(0.9, 0.02).minus(Score(0.95, 0.01)).z + 0.05 / (0.02 ** 2 + 0.01 ** 2) ** 0.5) < 1e-12


def test_students_trained_with_logit_kd_carry_plus_kd(tmp_path):
    from rdistill.report.stage import labels_for
    models = ["base", "branch:math", "mixture", "merge:ties", "teacher"]
    (tmp_path / "config.json").write_text(json.dumps({"train": {"kd": {"weight": 0.0}}}))
    plain = labels_for(tmp_path, models)
    assert not any("+kd" in v for v in plain.values()) and plain["mixture"] == "mixture (all SFT sets)"
    (tmp_path / "config.json").write_text(json.dumps({"train": {"kd": {"weight": 0.5}}}))
    kd = labels_for(tmp_path, models)
    assert kd["branch:math"] == "branch:math+kd" and kd["mixture"] == "mixture+kd (all SFT sets)"
    assert "merge:ties" not in kd and "base" not in kd  # merges of KD branches keep their names
