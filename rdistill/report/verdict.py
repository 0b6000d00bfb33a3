"""Did the method hold? The claims of Branch-Merge, each computed from the evaluation's numbers
with their standard errors, and said plainly when they fail.

Per domain d: the branch of d beats the base on d; the merge beats the base on d; the merge keeps
a share of the branch's gain, (merge - base) / (branch - base). Over domains: the merge's mean is
above every branch's mean (one model instead of one per domain), and how it compares with the
data-mixture baseline. A difference "beats" when it is above `Z` standard errors of the
difference; the errors of two rows are combined as if independent (sqrt(se1^2 + se2^2)), which
overstates the error of a paired comparison on the same prompts, so the verdict errs on the side
of "not shown".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

Z = 2.0  # standard errors a difference must clear
KEEP = 0.7  # share of each branch's gain the merge must keep


@dataclass
class Score:
    value: float
    se: float

    def minus(self, other: "Score") -> "Score":
        return Score(self.value - other.value, math.hypot(self.se, other.se))

    @property
    def z(self) -> float:
        if self.se > 0:
            return self.value / self.se
        # no spread (both sides at 0 or 100%): a difference is infinitely sure, none is no difference
        return math.copysign(math.inf, self.value) if self.value else 0.0


@dataclass
class Verdict:
    merged: str
    domains: dict = field(default_factory=dict)
    """domain -> {base, branch, merged, mixture: Score|None, branch_z, merge_z, kept, ...}."""
    means: dict = field(default_factory=dict)
    """row -> Score of its mean over domains."""
    claims: list = field(default_factory=list)
    """[(claim, held: bool, evidence)] in the order the report lists them."""

    @property
    def held(self) -> bool:
        return all(ok for _, ok, _ in self.claims)

    def to_dict(self) -> dict:
        def plain(x):
            if isinstance(x, Score):
                return {"value": round(x.value, 6), "se": round(x.se, 6)}
            if isinstance(x, dict):
                return {k: plain(v) for k, v in x.items()}
            return x
        return {"merged": self.merged, "held": self.held, "domains": plain(self.domains),
                "means": plain(self.means), "claims": [{"claim": c, "held": ok, "evidence": e}
                                                        for c, ok, e in self.claims]}


def _scores(results: list[dict]) -> dict[tuple[str, str], Score]:
    return {(r["model"], r["domain"]): Score(float(r["pass_at_1"]), float(r.get("stderr") or 0.0))
            for r in results}


def _mean(s: dict, model: str, domains: list[str]) -> Optional[Score]:
    vals = [s.get((model, d)) for d in domains]
    if not domains or any(v is None for v in vals):
        return None
    return Score(sum(v.value for v in vals) / len(vals), math.sqrt(sum(v.se ** 2 for v in vals)) / len(vals))


def kept_se(base: Score, branch: Score, merged: Score, kept: float) -> float:
    """Standard error of kept = (m - b) / (g = br - b) by the delta method, the three scores taken
    as independent: sqrt(se_m^2 + kept^2 se_br^2 + (kept - 1)^2 se_b^2) / g. On 100 prompts a
    gain of 30 points is measured to about +-15% of itself: a share of the gain is a noisy figure."""
    gain = branch.value - base.value
    return math.sqrt(merged.se ** 2 + (kept * branch.se) ** 2 + ((kept - 1) * base.se) ** 2) / gain


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def method_verdict(results: list[dict], domains: list[str], merged: str) -> Verdict:
    s = _scores(results)
    v = Verdict(merged)
    doms = [d for d in domains if ("base", d) in s and (f"branch:{d}", d) in s and (merged, d) in s]
    for d in doms:
        base, br, mg = s[("base", d)], s[(f"branch:{d}", d)], s[(merged, d)]
        gain = br.value - base.value
        kept = (mg.value - base.value) / gain if gain > 1e-12 else None
        v.domains[d] = {"base": base, "branch": br, "merged": mg, "mixture": s.get(("mixture", d)),
                        "branch_z": round(br.minus(base).z, 2), "merge_z": round(mg.minus(base).z, 2),
                        "kept": kept, "kept_se": None if kept is None else kept_se(base, br, mg, kept)}
    rows = ["base", merged, "mixture", *(f"branch:{d}" for d in domains)]
    v.means = {r: m for r in rows if (m := _mean(s, r, list(domains))) is not None}
    if not doms:
        return v
    weak = [d for d in doms if v.domains[d]["branch_z"] <= Z]
    v.claims.append((f"every branch beats the base on its own domain by more than {Z:g} standard errors",
                     not weak, ", ".join(f"{d}: {_pct(v.domains[d]['branch'].value)} vs {_pct(v.domains[d]['base'].value)}"
                                         f" ({v.domains[d]['branch_z']:+.1f} se)" for d in doms)))
    v.claims.append((f"the merge beats the base on every domain by more than {Z:g} standard errors",
                     all(v.domains[d]["merge_z"] > Z for d in doms),
                     ", ".join(f"{d}: {_pct(v.domains[d]['merged'].value)} vs {_pct(v.domains[d]['base'].value)}"
                               f" ({v.domains[d]['merge_z']:+.1f} se)" for d in doms)))
    kept = {d: v.domains[d]["kept"] for d in doms}
    v.claims.append((f"the merge keeps at least {100 * KEEP:.0f}% of each branch's gain on its domain",
                     all(k is not None and k >= KEEP for k in kept.values()),
                     ", ".join(f"{d}: {_kept(v.domains[d])}" for d in kept)))
    mm = v.means.get(merged)
    best = max(((r, m) for r, m in v.means.items() if r.startswith("branch:")), key=lambda x: x[1].value, default=None)
    if mm and best:
        v.claims.append(("the merge's mean over domains is above every branch's mean",
                         mm.value > best[1].value,
                         f"merge {_pct(mm.value)} ± {_pct(mm.se)} vs best branch ({best[0]}) "
                         f"{_pct(best[1].value)} ± {_pct(best[1].se)}"))
    return v


def _kept(x: dict) -> str:
    return "-" if x["kept"] is None else f"{100 * x['kept']:.0f}% ± {100 * x['kept_se']:.0f}%"


def mixture_line(v: Verdict) -> str:
    """How the merge compares with the data-mixture baseline (not a claim: a comparison)."""
    mm, mx = v.means.get(v.merged), v.means.get("mixture")
    if not (mm and mx):
        return "No data-mixture baseline in this run (train.mixture_baseline=false)."
    d = mm.minus(mx)
    word = "above" if d.z > Z else "below" if d.z < -Z else "within noise of"
    per = ", ".join(f"{k}: {_pct(x['merged'].value)} vs {_pct(x['mixture'].value)} "
                    f"({x['merged'].minus(x['mixture']).z:+.1f} se)"
                    for k, x in v.domains.items() if x.get("mixture"))
    return (f"Against the data-mixture baseline (one student on all SFT sets, each domain's samples seen as "
            f"often as by its branch): the merge's mean {_pct(mm.value)} is {word} the mixture's "
            f"{_pct(mx.value)} ({d.z:+.1f} se); per domain {per}. What each side cost: the Cost section.")


def verdict_markdown(v: Verdict) -> str:
    if not v.domains:
        return f"(no base/branch/{v.merged} scores to compare)"
    lines = [f"| domain | base | own branch | {v.merged} | mixture | branch vs base | merge vs base | gain kept |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for d, x in v.domains.items():
        kept = _kept(x)
        mix = x.get("mixture")
        lines.append(f"| {d} | {_pct(x['base'].value)} ± {_pct(x['base'].se)} | {_pct(x['branch'].value)} ± "
                     f"{_pct(x['branch'].se)} | {_pct(x['merged'].value)} ± {_pct(x['merged'].se)} | "
                     f"{'-' if mix is None else f'{_pct(mix.value)} ± {_pct(mix.se)}'} | "
                     f"{x['branch_z']:+.1f} se | {x['merge_z']:+.1f} se | {kept} |")
    lines += ["", f"**The method {'held' if v.held else 'did not hold'} on this run.**", ""]
    lines += [f"- {'held' if ok else '**did not hold**'}: {claim} ({evidence})" for claim, ok, evidence in v.claims]
    lines += ["", mixture_line(v), "",
              f"(pass@1 x 100 ± one standard error over prompts; a difference counts when above {Z:g} "
              "standard errors of the difference, errors combined as if independent.)"]
    return "\n".join(lines)
