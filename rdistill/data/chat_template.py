"""The chat template SFT samples are rendered with, and the check that it keeps the reasoning.

Why: DeepSeek-R1-Distill's own template cuts every assistant turn at `</think>` (right for chat
history, where old reasoning is dropped), so SFT with it would train the student on bare answers.
`train.chat_template` names a bundled template (rdistill/data/templates/<name>.jinja) or a .jinja
file that renders assistant turns whole; the trained branches keep the student's own template
for serving.
"""

from __future__ import annotations

from pathlib import Path

BUNDLED = Path(__file__).resolve().parent / "templates"
PROBE_REASONING = "step-one-of-the-reasoning"


def bundled_names() -> list[str]:
    return sorted(p.stem for p in BUNDLED.glob("*.jinja"))


def resolve_chat_template(name_or_path: str) -> str:
    """The template text of a bundled name or a path; ValueError (one line) when neither exists."""
    p = Path(name_or_path).expanduser()
    if p.suffix == ".jinja" and p.is_file():
        return p.read_text()
    if (BUNDLED / f"{name_or_path}.jinja").is_file():
        return (BUNDLED / f"{name_or_path}.jinja").read_text()
    raise ValueError(f"train.chat_template={name_or_path!r} is neither a bundled template "
                     f"({', '.join(bundled_names())}) nor an existing .jinja file")


def apply_chat_template_override(tok, name_or_path: str | None):
    """Set the tokenizer's template for rendering SFT samples (in place); returns the tokenizer."""
    if name_or_path:
        tok.chat_template = resolve_chat_template(name_or_path)
    return tok


def drops_reasoning(tok) -> bool:
    """True when the template renders an assistant turn `<think> R </think> A` without R."""
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": f"<think>\n{PROBE_REASONING}\n</think>\n\nanswer"}]
    return PROBE_REASONING not in tok.apply_chat_template(msgs, tokenize=False)
