"""A byte-level BPE tokenizer trained on a toy corpus, with a Qwen-style chat template and the
special tokens a reasoning model uses, saved in Hugging Face format."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

IM_START, IM_END, EOT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
THINK, END_THINK = "<think>", "</think>"
SPECIAL_TOKENS = [EOT, IM_START, IM_END]
# <think> and </think> are added tokens but not "special", as in DeepSeek-R1's tokenizer: decoding
# with skip_special_tokens (vLLM's default) keeps them, so the verifier sees the reasoning format.
THINK_TOKENS = [THINK, END_THINK]

# Qwen-style ChatML. The generation prompt opens the assistant turn only: the model itself
# writes <think> ... </think> and the answer, then <|im_end|>, which ends generation.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 512):
    """Train a byte-level BPE on `corpus`; returns a transformers PreTrainedTokenizerFast."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digits split one by one: arithmetic is learned digit by digit, like Qwen's tokenizer does.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=EOT,
                                   bos_token=None, unk_token=None,
                                   additional_special_tokens=[IM_START])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(tok, out_dir: str | Path) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
