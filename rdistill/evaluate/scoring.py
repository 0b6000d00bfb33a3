"""Scoring evaluation samples with the verify stage's own verifiers, inside the Ray Data pipeline.

A sample is correct only when the model finished (not cut at max tokens, no generation error)
and the domain's verifier accepts its answer: the same judgement that kept teacher samples in
the SFT sets, so the table measures what the branches were distilled for.
"""

from __future__ import annotations

import math

from rdistill.topology import LIGHT_CPU


def score_rows(df, sandbox=None):
    """Add `correct` (bool), `reason` (str), `extracted` (the judged answer) and `infra` (no
    verdict: the sandbox or a busy machine failed, not the model) to a pandas batch of generated
    rows (columns kind, language, completion, gold, tests, entry_point)."""
    from rdistill.verify.scoring import score
    correct, reasons, extracted, infra = [], [], [], []
    for row in df.to_dict("records"):
        # pandas turns None into NaN in mixed columns; the verifiers expect None
        row = {k: (None if isinstance(x, float) and math.isnan(x) else x) for k, x in row.items()}
        v = None
        if row.get("error"):
            why = "generation error"
        elif row.get("finish_reason") != "stop":
            why = f"incomplete ({row.get('finish_reason')})"
        else:
            v = score(row["kind"], row["completion"], row, sandbox=sandbox,
                      language=row.get("language") or "python")
            why = v.reason
        correct.append(bool(v and v.correct))
        reasons.append(why)
        extracted.append(v.extracted if v else None)
        infra.append(bool(v and v.infra))
    df = df.copy()
    df["correct"], df["reason"], df["extracted"], df["infra"] = correct, reasons, extracted, infra
    return df


def score_dataset(ds, cfg):
    """`ds` with every generated sample scored (lazy, like the rest of the pipeline). Light
    tasks: code samples run in their own sandbox processes, math and letters are cheap."""
    return ds.map_batches(score_rows, batch_format="pandas", batch_size=64,
                          fn_kwargs={"sandbox": cfg.verify.sandbox}, num_cpus=LIGHT_CPU)
