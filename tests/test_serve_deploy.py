"""A real Ray Serve LLM deployment of a tiny model, made by the serve stage once for the module:
chat (plain and streamed) with the <think> part split off, completions, the API key, bad
requests answered 4xx while the server stays up, and a short load run with zero errors.

The model is a tiny Qwen2 trained here for a few seconds to say one reasoning answer by heart,
so greedy decoding gives a known `<think>...</think> answer` to check the parser against."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.slow

PROMPT = "What is 12 + 30?"
REASONING = "2+0=2 ; 1+3=4"
ANSWER = "The answer is \\boxed{42}."
KEY_ENV, KEY = "RDISTILL_TEST_SERVE_KEY", "test-key-123"


def memorized_model(out, steps: int = 150):
    """The toy tokenizer and a tiny random Qwen2, fitted to one chat until greedy decoding
    reproduces its reply (about 150 AdamW steps on one 56-token sequence)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rdistill.toy.model import save_model, tiny_test_model
    tiny_test_model(out)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    chat = [{"role": "user", "content": PROMPT},
            {"role": "assistant", "content": f"<think>{REASONING}</think> {ANSWER}"}]
    ids = torch.tensor([tok(tok.apply_chat_template(chat, tokenize=False))["input_ids"]])
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    save_model(model.eval(), tok, out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    """The serve stage, deploy-and-return, serving the run's `merged` model with an API key."""
    from ray import serve

    from rdistill.config import validated
    from rdistill.pipeline import StageContext
    from rdistill.rundir import RunDir
    from rdistill.serve import stage
    root = tmp_path_factory.mktemp("serve_run")
    memorized_model(root / "merge" / "fusion" / "final")
    (root / "merge" / "selection.json").write_text(json.dumps({"path": "merge/fusion/final"}))
    cfg = validated({"name": "toy-served", "run_dir": str(root), "domains": {"m": {"train": {"path": "x"}}},
                     "serve": {"port": free_port(), "api_key_env": KEY_ENV, "engine": {"max_model_len": 256},
                               "blocking": False}})
    os.environ[KEY_ENV] = KEY
    url = f"http://127.0.0.1:{cfg.serve.port}/v1"
    seen, stop = [], threading.Event()  # what a load balancer polling /v1/models sees meanwhile
    poller = threading.Thread(target=_poll_models, args=(url, seen, stop), daemon=True)
    poller.start()
    try:
        info = stage.run(StageContext(cfg, RunDir(root), root / "out", root / "work"))
        stop.set()
        poller.join()
        from rdistill.serve.loadtest import load_test
        # the first requests after "ready", then the same again: what a client sees at once
        first = load_test(url, "toy-served", n_requests=16, concurrency=16, max_tokens=16, api_key=KEY)
        later = load_test(url, "toy-served", n_requests=16, concurrency=16, max_tokens=16, api_key=KEY)
        yield {**info, "polled": seen, "first": first, "later": later}
    finally:
        os.environ.pop(KEY_ENV, None)
        serve.shutdown()


def _poll_models(url: str, seen: list, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            seen.append(httpx.get(url + "/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).status_code)
        except httpx.HTTPError:
            seen.append("no answer")
        time.sleep(0.5)


def test_ready_only_when_it_can_generate(served):
    """/v1/models says 503 while the model loads and 200 once a request has gone through; the
    first 16 requests after that are as fast as the next 16 (seen before: 51.6 s each, for
    a model that answers in under a second)."""
    polled = [s for s in served["polled"] if s != "no answer"]
    assert 503 in polled and 200 not in polled[:polled.index(503) + 1], served["polled"]
    first, later = served["first"], served["later"]
    assert first["errors"] == later["errors"] == 0
    assert first["latency_ms"]["max"] <= 3 * later["latency_ms"]["max"] + 2000, (first, later)


def post(served, path, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(served["url"] + path, json=body, headers=headers, timeout=120, **kw)


def chat_body(**extra):
    return {"model": "toy-served", "messages": [{"role": "user", "content": PROMPT}],
            "temperature": 0, "max_tokens": 40, **extra}


def test_stage_serves_the_merged_model_under_the_run_name(served):
    assert served["served_name"] == "toy-served" and served["auth"] is True
    assert served["model"].endswith(os.path.join("merge", "fusion", "final"))
    r = httpx.get(served["url"] + "/models", headers={"Authorization": f"Bearer {KEY}"})
    assert [m["id"] for m in r.json()["data"]] == ["toy-served"]


def test_chat_splits_reasoning_from_answer_with_the_openai_client(served):
    from openai import OpenAI
    client = OpenAI(base_url=served["url"], api_key=KEY)
    r = client.chat.completions.create(**chat_body())
    msg = r.choices[0].message
    reasoning = getattr(msg, "reasoning_content", None) or getattr(msg, "reasoning", None)
    assert msg.content.strip() == ANSWER
    assert reasoning.strip() == REASONING
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens > 0


def test_streamed_chat_gives_the_same_split(served):
    from openai import OpenAI
    client = OpenAI(base_url=served["url"], api_key=KEY)
    content, reasoning = [], []
    for chunk in client.chat.completions.create(**chat_body(), stream=True):
        if chunk.choices:
            d = chunk.choices[0].delta
            content.append(d.content or "")
            reasoning.append(getattr(d, "reasoning_content", None) or getattr(d, "reasoning", None) or "")
    assert "".join(content).strip() == ANSWER and "".join(reasoning).strip() == REASONING


def test_completions_return_the_raw_think_format(served):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(served["model"])
    prompt = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                     add_generation_prompt=True)
    r = post(served, "/completions", {"model": "toy-served", "prompt": prompt, "temperature": 0,
                                      "max_tokens": 40})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"].strip() == f"<think>{REASONING}</think> {ANSWER}"


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_requests_without_the_key_get_401(served, key):
    for r in (post(served, "/chat/completions", chat_body(), key=key),
              httpx.get(served["url"] + "/models", headers={"Authorization": f"Bearer {key}"} if key else {})):
        assert r.status_code == 401 and r.json()["error"]["code"] == 401


BAD_REQUESTS = {
    "unknown model": chat_body(model="no-such-model"),
    "max_tokens beyond the context": chat_body(max_tokens=100_000),
    "prompt beyond the context": chat_body(messages=[{"role": "user", "content": "1 2 3 " * 400}]),
    "negative temperature": chat_body(temperature=-1),
    "top_p above 1": chat_body(top_p=2),
    "n of 0": chat_body(n=0),
    "negative max_tokens": chat_body(max_tokens=-5),
    "temperature of the wrong type": chat_body(temperature="hot"),
    "messages not a list": chat_body(messages="hi"),
    "messages null": chat_body(messages=None),
    "empty messages": chat_body(messages=[]),
    "top_logprobs above the limit": chat_body(logprobs=True, top_logprobs=50),
    "missing messages": {"model": "toy-served"},
}


@pytest.mark.parametrize("what", sorted(BAD_REQUESTS))
def test_bad_requests_get_4xx_with_an_openai_error(served, what):
    r = post(served, "/chat/completions", BAD_REQUESTS[what])
    assert 400 <= r.status_code < 500, (what, r.status_code, r.text)
    assert r.json()["error"]["message"]


def test_malformed_json_gets_400_and_the_server_stays_up(served):
    r = httpx.post(served["url"] + "/chat/completions", content=b'{"model": "toy-served", "messages": [',
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"]
    r = post(served, "/chat/completions", chat_body())
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].strip() == ANSWER


def test_short_load_run_has_zero_errors(served):
    from rdistill.serve.loadtest import load_test
    r = load_test(served["url"], "toy-served", n_requests=64, concurrency=16, max_tokens=16, api_key=KEY)
    assert r["errors"] == 0 and r["ok"] == 64, r
    assert r["requests_per_s"] > 0 and r["latency_ms"]["p50"] <= r["latency_ms"]["p99"]
