"""Back-of-envelope sizes for the dry run: prompts, samples, teacher tokens, disk and memory.

Upper bounds where the truth depends on the teacher (every sample is costed at max_tokens), so a
user sees the worst case before spending tokens or GPU hours.
"""

from __future__ import annotations

import json
from pathlib import Path

from rdistill.config import ExperimentConfig, SourceConfig, branch_train_config
from rdistill.rundir import RunDir

PROMPT_TOKENS = 300  # a typical competition problem with its instruction suffix
BYTES_PER_TOKEN = 4  # UTF-8 text per token, roughly, for English and code


def source_rows(src: SourceConfig | None, cfg: ExperimentConfig, split: str) -> int | None:
    """Rows a source yields: its limit, the toy config, a local file's line count, or expected_rows."""
    if src is None:
        return 0
    n = None
    if src.path and src.path.startswith("toy:"):
        n = {"train": cfg.toy.n_train, "dev": cfg.toy.n_dev, "test": cfg.toy.n_test}.get(split)
    elif src.path and Path(src.path).expanduser().is_file() and src.path.endswith(".jsonl"):
        with open(Path(src.path).expanduser()) as f:
            n = sum(1 for line in f if line.strip())
    else:
        n = src.expected_rows
    if n is not None and src.limit:
        n = min(n, src.limit)
    return n


def model_params(ref: str, params_b: float | None, run: RunDir) -> float | None:
    """Parameters of a model: the config's hint, else computed from a local config.json."""
    if params_b:
        return params_b * 1e9
    from rdistill.refs import resolve_model
    try:
        path = Path(resolve_model(ref, run))
    except Exception:
        return None
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        return None
    c = json.loads(cfg_file.read_text())
    h, L, v, i = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"], c["intermediate_size"]
    kv = c.get("num_key_value_heads", c["num_attention_heads"]) * (h // c["num_attention_heads"])
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i
    return float(L * per_layer + v * h * (1 if c.get("tie_word_embeddings") else 2))


def _gb(x: float) -> str:
    return f"{x / 1e9:.1f} GB" if x >= 1e8 else f"{x / 1e6:.1f} MB"


def estimate(cfg: ExperimentConfig) -> list[str]:
    """Lines for the dry run."""
    return _estimate(cfg)[0]


def disk_bytes(cfg: ExperimentConfig) -> float:
    """Disk the run's artifacts need, about (preflight compares it with the free space)."""
    return _estimate(cfg)[1]


def _estimate(cfg: ExperimentConfig) -> tuple[list[str], float]:
    run = RunDir(cfg.run_dir)
    s = cfg.generate.sampling
    lines, total_samples, unknown = [], 0, []
    for name, d in cfg.domains.items():
        rows = [source_rows(src, cfg, "train") for src in [d.train, *d.extra_train]]
        if any(r is None for r in rows):
            unknown.append(name)
            continue
        prompts = sum(rows)
        total_samples += prompts * s.n
        ev = (d.eval_samples or cfg.eval.sampling.n)
        tests = source_rows(d.test, cfg, "test")
        lines.append(f"  {name}: {prompts} prompts x {s.n} samples = {prompts * s.n} teacher samples; "
                     f"eval {tests if tests is not None else '?'} prompts x {ev} samples")
    if unknown:
        lines.append(f"  (prompt counts unknown for {', '.join(unknown)}: set expected_rows on their sources)")
    tokens = total_samples * (s.max_tokens + PROMPT_TOKENS)
    lines.append(f"  teacher tokens: at most {tokens / 1e6:.1f}M ({total_samples} samples x "
                 f"({s.max_tokens} max + ~{PROMPT_TOKENS} prompt))")
    gen_disk = total_samples * (s.max_tokens + PROMPT_TOKENS) * BYTES_PER_TOKEN
    params = model_params(cfg.student.base, cfg.student.params_b, run)
    disk = gen_disk * 2  # generate + verify copies of the text
    if params:
        weights = params * 2  # bf16
        steps = sum(len(c.steps) for c in cfg.merge.candidates)
        ckpt = 0.0
        for dom in cfg.domains:
            tc = branch_train_config(cfg, dom)
            # a ZeRO checkpoint keeps bf16 weights plus fp32 master weights and Adam moments
            ckpt = max(ckpt, params * (2 + 12))
            per_worker = params * (2 + 2 + 12) / (tc.num_workers if tc.zero_stage == 3 else 1)
            lines.append(f"  train {dom}: ~{_gb(per_worker)} of model+optimizer state per worker "
                         f"(ZeRO-{tc.zero_stage}, {tc.num_workers} workers), plus activations")
        disk += weights * (len(cfg.domains) + steps) + ckpt * len(cfg.domains)
        lines.append(f"  student: {params / 1e9:.2f}B parameters ({_gb(weights)} in bf16)")
    lines.append(f"  disk for artifacts: about {_gb(disk)} (text {_gb(gen_disk * 2)}"
                 + (", branch and merge weights, one training checkpoint per branch)" if params else ")"))
    return ["estimates:"] + lines, disk
