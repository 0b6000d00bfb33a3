"""Tiny Qwen2-architecture models in Hugging Face format.

head_dim is 64 because vLLM's CPU attention refuses smaller heads (it rejected 16).
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_SHAPE = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=2,
                     num_key_value_heads=1, intermediate_size=512)


def qwen2_config(tokenizer, max_len: int = 1024, **shape):
    from transformers import Qwen2Config
    s = {**DEFAULT_SHAPE, **shape}
    assert s["hidden_size"] // s["num_attention_heads"] == 64, "vLLM's CPU backend needs head_dim 64"
    return Qwen2Config(vocab_size=len(tokenizer), max_position_embeddings=max_len,
                       tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=10000.0,
                       bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                       pad_token_id=tokenizer.pad_token_id, **s)


def save_model(model, tokenizer, out_dir: str | Path, max_new_tokens: int = 256) -> Path:
    """Save weights (safetensors), config, tokenizer with chat template and a generation config
    that stops on the end-of-turn token."""
    from transformers import GenerationConfig
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id],
        pad_token_id=tokenizer.pad_token_id, do_sample=True, temperature=0.6, top_p=0.95,
        max_new_tokens=max_new_tokens)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def init_model(tokenizer, out_dir: str | Path, seed: int = 0, max_len: int = 1024, **shape) -> Path:
    """A randomly initialised tiny Qwen2 saved as an HF model directory (bf16-safe, float32 on disk)."""
    import torch
    from transformers import Qwen2ForCausalLM
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(qwen2_config(tokenizer, max_len=max_len, **shape))
    return save_model(model, tokenizer, out_dir)


def tiny_test_model(out_dir: str | Path, seed: int = 0, **shape) -> Path:
    """A random tiny model with a small tokenizer, for tests of stages that only need a model
    that loads everywhere (merge, serve, generation plumbing)."""
    from rdistill.toy.tokenizer import train_tokenizer
    corpus = ["What is 12 + 30? <think>2+0=2 ; 1+3=4</think> The answer is \\boxed{42}.",
              "def f(x):\n    return x * 3 + 2\n", "Answer: B. 3 km = 3000 m > 2500 m."] * 20
    tok = train_tokenizer(corpus, vocab_size=300)
    return init_model(tok, out_dir, seed=seed, **shape)
