"""A closed-loop load test of an OpenAI-compatible endpoint: `concurrency` clients each send
chat requests back to back until `n_requests` are done; reports requests/s, latency
percentiles, tokens/s and errors (any non-200 answer, timeout or malformed body)."""

from __future__ import annotations

import asyncio
import time
from typing import Optional

DEFAULT_PROMPTS = ["What is 27 + 58?", "What is 90 + 13?", "Write a function that doubles x.",
                   "Which is longer: 3 km or 2500 m? A. 3 km B. 2500 m"]


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method), q in [0, 100]."""
    if not values:
        return float("nan")
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


async def _run(url: str, model: str, n_requests: int, concurrency: int, max_tokens: int,
               api_key: Optional[str], prompts: list[str], timeout_s: float) -> dict:
    import httpx
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    latencies: list[float] = []
    tokens = 0
    errors: dict[str, int] = {}
    next_id = iter(range(n_requests))

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        for i in next_id:  # a shared iterator: each request is taken by exactly one client
            body = {"model": model, "max_tokens": max_tokens, "temperature": 0.6, "top_p": 0.95,
                    "messages": [{"role": "user", "content": prompts[i % len(prompts)]}]}
            t0 = time.perf_counter()
            try:
                r = await http.post(url.rstrip("/") + "/chat/completions", json=body, headers=headers)
                ok = r.status_code == 200 and r.json()["choices"][0]["message"] is not None
                why = None if ok else f"HTTP {r.status_code}"
                if ok:
                    tokens += r.json().get("usage", {}).get("completion_tokens", 0)
            except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
                why = type(e).__name__
            if why:
                errors[why] = errors.get(why, 0) + 1
            else:
                latencies.append(time.perf_counter() - t0)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    n_err = sum(errors.values())
    ms = [x * 1000 for x in latencies]
    return {"requests": n_requests, "concurrency": concurrency, "max_tokens": max_tokens,
            "ok": len(latencies), "errors": n_err, "error_kinds": errors,
            "wall_s": round(wall, 2), "requests_per_s": round(len(latencies) / wall, 2),
            "completion_tokens_per_s": round(tokens / wall, 1),
            "latency_ms": {"mean": round(sum(ms) / len(ms), 1) if ms else None,
                           **{f"p{q}": round(percentile(ms, q), 1) for q in (50, 90, 95, 99)},
                           "max": round(max(ms), 1) if ms else None}}


def load_test(url: str, model: str, n_requests: int = 200, concurrency: int = 16,
              max_tokens: int = 32, api_key: Optional[str] = None,
              prompts: Optional[list[str]] = None, timeout_s: float = 120.0) -> dict:
    """Send `n_requests` chat completions with `concurrency` in flight; returns the figures."""
    if n_requests < 1 or concurrency < 1:
        raise ValueError("n_requests and concurrency must be >= 1")
    return asyncio.run(_run(url, model, n_requests, concurrency, max_tokens, api_key,
                            prompts or DEFAULT_PROMPTS, timeout_s))


def format_report(r: dict) -> str:
    lat = r["latency_ms"]
    return (f"{r['ok']}/{r['requests']} ok, {r['errors']} errors {r['error_kinds'] or ''} at concurrency "
            f"{r['concurrency']}: {r['requests_per_s']} req/s, {r['completion_tokens_per_s']} tokens/s, "
            f"latency ms p50 {lat['p50']} p90 {lat['p90']} p99 {lat['p99']} max {lat['max']} "
            f"(wall {r['wall_s']} s)")
