"""Tokenize chat SFT samples with the student's own chat template, loss only on assistant turns.

A sample is a JSON line `{"id", "messages": [{"role", "content"}, ...]}`. The loss covers each
assistant turn's content (reasoning and answer) and the end-of-turn token that closes it, never
the prompt, the role header or what the template puts after the end-of-turn token.

The assistant spans are found by rendering the conversation prefix by prefix (messages[:i] with
the generation prompt, then messages[:i+1]) and mapping character spans to tokens through the
fast tokenizer's offsets. This works with any template that renders a conversation as the
concatenation of its turns, and needs no `{% generation %}` markers in the template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from rdistill.errors import DataError

IGNORE = -100  # label of tokens without loss (torch's cross_entropy ignore_index)


class SFTDataError(DataError):
    """An SFT set or a tokenizer that cannot be trained on; the message says what to fix."""


@dataclass
class Tokenized:
    input_ids: list[int]
    loss_mask: list[int]
    """1 where the token is an assistant token the model must learn to produce."""
    id: str = ""

    @property
    def targets(self) -> list[int]:
        """Next-token targets already shifted within the sample: position j predicts token j+1
        when that token is an assistant token, else IGNORE. Shifting per sample (not per packed
        row) means no sample is ever asked to predict its neighbour's first token."""
        ids, m = self.input_ids, self.loss_mask
        return [ids[j + 1] if m[j + 1] else IGNORE for j in range(len(ids) - 1)] + [IGNORE]


@dataclass
class TokenizeStats:
    samples: int = 0
    kept: int = 0
    dropped_too_long: int = 0
    no_assistant_tokens: int = 0
    loss_tokens: int = 0
    tokens: int = 0
    longest: int = 0
    files: list[str] = field(default_factory=list)


def check_tokenizer(tok) -> None:
    if not getattr(tok, "chat_template", None):
        raise SFTDataError(f"the student's tokenizer ({tok.name_or_path}) has no chat template: add "
                           "chat_template to its tokenizer_config.json (or chat_template.jinja)")
    if not getattr(tok, "is_fast", False):
        raise SFTDataError(f"the student's tokenizer ({tok.name_or_path}) is not a fast tokenizer: "
                           "loss masking needs character offsets (save it with tokenizer.json)")
    if tok.eos_token is None:
        raise SFTDataError(f"the student's tokenizer ({tok.name_or_path}) has no eos_token: set it to the "
                           "end-of-turn token (e.g. <|im_end|>)")
    from rdistill.data.chat_template import drops_reasoning
    if drops_reasoning(tok):
        raise SFTDataError(f"the chat template of {tok.name_or_path} drops the <think> reasoning from "
                           "assistant turns (DeepSeek-R1-Distill's does), so SFT would train on bare "
                           "answers: set train.chat_template=r1_distill_keep_reasoning (or a .jinja path)")


def parse_sft_line(line: str, where: str, default_id: str) -> dict | None:
    """One JSONL line as an SFT record (None for a blank line); `where` (file:line) names it in
    the SFTDataError a bad line raises."""
    if not line.strip():
        return None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise SFTDataError(f"{where}: not valid JSON ({e.msg})") from None
    msgs = rec.get("messages") if isinstance(rec, dict) else None
    if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m
                                            and isinstance(m.get("content"), str) for m in msgs):
        raise SFTDataError(f"{where}: needs 'messages': a list of {{role, content}} with string content")
    rec.setdefault("id", default_id)
    return rec


def read_sft_jsonl(paths: Iterable[str]) -> Iterator[dict]:
    """Yield SFT records from JSONL files; a file that is missing or a line that is not a chat
    sample raises SFTDataError naming the file and line."""
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise SFTDataError(f"SFT file {path} does not exist: run the verify stage first or fix the path")
        with p.open() as f:
            for n, line in enumerate(f, 1):
                rec = parse_sft_line(line, f"{path}:{n}", f"{p.name}:{n}")
                if rec is not None:
                    yield rec


def _render(tok, messages: list[dict], gen_prompt: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt)


def tokenize_chat(tok, messages: list[dict], sample_id: str = "") -> Tokenized:
    """Token ids of the rendered conversation and its assistant-only loss mask."""
    full = _render(tok, messages, False)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tok, messages[:i], True) if i else _render(tok, [], True)
        upto = _render(tok, messages[: i + 1], False)
        if not (full.startswith(before) and full.startswith(upto) and len(upto) >= len(before)):
            raise SFTDataError(f"sample {sample_id}: the chat template does not render the conversation as "
                               "a concatenation of its turns, so assistant tokens cannot be located")
        turn = upto[len(before):]
        end = turn.find(tok.eos_token)
        # Loss on the content and the end-of-turn token; not on what follows it (e.g. "\n").
        stop = len(before) + (end + len(tok.eos_token) if end >= 0 else len(turn))
        spans.append((len(before), stop))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [0] * len(enc["input_ids"])
    for j, (a, b) in enumerate(enc["offset_mapping"]):
        if b > a and any(s <= a and b <= e for s, e in spans):
            mask[j] = 1
    return Tokenized(list(enc["input_ids"]), mask, sample_id)


KEPT, TOO_LONG, NO_ASSISTANT = 0, 1, 2  # what became of a sample (tokenize_record)


def tokenize_record(tok, rec: dict, max_len: int) -> tuple[int, Tokenized | None]:
    """(status, tokens) of one SFT record: samples longer than max_len are dropped, never
    truncated (a cut answer would teach the model to stop mid-thought)."""
    if not any(m["role"] == "assistant" and m["content"].strip() for m in rec["messages"]):
        return NO_ASSISTANT, None  # an empty answer would only teach the model to stop at once
    t = tokenize_chat(tok, rec["messages"], str(rec["id"]))
    if sum(t.loss_mask[1:]) == 0:  # token 0 is never predicted
        return NO_ASSISTANT, t
    if len(t.input_ids) > max_len:
        return TOO_LONG, t
    return KEPT, t


def count_sample(st: TokenizeStats, status: int, length: int, loss_tokens: int) -> None:
    st.samples += 1
    if status == NO_ASSISTANT:
        st.no_assistant_tokens += 1
    elif status == TOO_LONG:
        st.dropped_too_long += 1
    else:
        st.kept += 1
        st.tokens += length
        st.loss_tokens += loss_tokens
        st.longest = max(st.longest, length)


def check_stats(st: TokenizeStats, max_len: int) -> None:
    """Fail when nothing trainable is left, saying why."""
    where = ", ".join(st.files) or "(no files)"
    if st.samples == 0:
        raise SFTDataError(f"the SFT set {where} is empty: nothing to train on (check the verify stage's funnel)")
    if st.kept == 0 and st.no_assistant_tokens == st.samples:
        raise SFTDataError(f"the SFT set {where} has no assistant tokens: each sample needs an assistant "
                           "message with non-empty content")
    if st.kept == 0:
        raise SFTDataError(f"every sample of {where} is longer than max_len={max_len} tokens "
                           f"({st.dropped_too_long} dropped): raise train.max_len")


def tokenize_files(tok, paths: list[str], max_len: int) -> tuple[list[Tokenized], TokenizeStats]:
    """Tokenize every sample of the SFT files in this process (rdistill.data.tokenize_ray does
    the same across a cluster); fails when nothing trainable is left."""
    check_tokenizer(tok)
    st = TokenizeStats(files=[str(p) for p in paths])
    out: list[Tokenized] = []
    for rec in read_sft_jsonl(paths):
        status, t = tokenize_record(tok, rec, max_len)
        count_sample(st, status, len(t.input_ids) if t else 0, sum(t.loss_mask[1:]) if t else 0)
        if status == KEPT:
            out.append(t)
    check_stats(st, max_len)
    return out, st
