"""Fault handling around Ray Data's HTTP processor for OpenAI-compatible endpoints.

Ray's `HttpRequestUDF` (ray.data.llm's HttpRequestProcessorConfig) retries 429/408/502/503/504,
timeouts and dropped connections with exponential backoff, but (ray 2.60) it does not retry a
500 or an undecodable body, it sends a batch's requests one after another, and a single request
that exhausts its retries raises and fails the whole dataset. Here:
- `CheckedResponse` turns a 5xx or a malformed body into a `ClientPayloadError`, which Ray's
  own retry loop already backs off on and retries;
- `RowTolerantHttpUDF` runs each row through Ray's UDF on its own (concurrently, at most
  `max_in_flight` rows of one actor at a time, paced to the configured qps), so a row that still
  fails becomes an error row instead of failing the run, and parses the chat completion into
  flat columns. All of an actor's concurrent batches run on its one asyncio loop (Ray Data's
  map actor loop), so the limit and the pacing hold across them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Dict, List, Optional

import aiohttp
from aiohttp.client_exceptions import ClientPayloadError
from ray.llm._internal.batch.stages.http_request_stage import HttpRequestUDF

OUT_COLUMNS = ("completion", "finish_reason", "prompt_tokens", "completion_tokens", "error")


class CheckedResponse(aiohttp.ClientResponse):
    """A response whose `json()` raises a retryable error for 5xx and malformed bodies."""

    async def json(self, *args: Any, **kwargs: Any) -> Any:
        if self.status >= 500:
            raise ClientPayloadError(f"HTTP {self.status} {self.reason}")
        try:
            body = await super().json(content_type=None)
        except ValueError as e:  # json.JSONDecodeError
            raise ClientPayloadError(f"malformed response body (HTTP {self.status}): {e}") from None
        if not isinstance(body, dict):
            raise ClientPayloadError(f"malformed response body (HTTP {self.status}): not a JSON object")
        if self.status < 400 and not isinstance(body.get("choices"), list):
            raise ClientPayloadError(f"malformed response body (HTTP {self.status}): no choices")
        return body


class SessionFactory:
    """Picklable factory of aiohttp sessions with a per-request timeout and `CheckedResponse`."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s

    def __call__(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                                     response_class=CheckedResponse)


def parse_completion(body: Dict[str, Any]) -> Dict[str, Any]:
    """Flat columns from an OpenAI chat completion body (or an API error body). Reasoning
    models' separate `reasoning_content` (DeepSeek's API, `vllm serve --reasoning-parser`)
    is put back as `<think>...</think>` before the answer, the format the verifier checks."""
    if "error" in body and not body.get("choices"):
        err = body["error"]
        msg = err.get("message", err) if isinstance(err, dict) else err
        return _error_row(f"endpoint error: {msg}")
    choice = body["choices"][0]
    msg = choice.get("message") or {}
    text = msg.get("content") or choice.get("text") or ""
    reasoning = msg.get("reasoning_content") or msg.get("reasoning")
    if reasoning:
        text = f"<think>\n{reasoning}\n</think>\n\n{text}"
    reason = choice.get("finish_reason") or "stop"
    usage = body.get("usage") or {}
    row = {"completion": text, "finish_reason": "stop", "prompt_tokens": int(usage.get("prompt_tokens") or 0),
           "completion_tokens": int(usage.get("completion_tokens") or 0), "error": None}
    if reason == "length":
        row["finish_reason"] = "length"
    elif reason not in ("stop", "eos"):
        row.update(finish_reason="error", error=f"finish_reason {reason}")
    return row


def _error_row(msg: str) -> Dict[str, Any]:
    return {"completion": "", "finish_reason": "error", "prompt_tokens": 0, "completion_tokens": 0,
            "error": msg[:1000]}


def _short(e: Exception) -> str:
    """Ray's give-up message starts with the whole payload; keep the part that says why."""
    s = str(e)
    if "Previous Exception:" in s:
        s = "gave up after retries: " + s.split("Previous Exception:", 1)[1].split("Full Traceback")[0].strip(" .\n")
    return f"{type(e).__name__}: {s}"


class RowTolerantHttpUDF(HttpRequestUDF):
    """Ray's HTTP UDF applied row by row: concurrent within a batch, paced to `rate_qps`, and a
    row that fails after Ray's retries is an error row rather than a failed dataset."""

    def __init__(self, *args: Any, rate_qps: Optional[float] = None, max_in_flight: Optional[int] = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.qps = None  # pacing is ours: Ray's per-call pacing does not hold across concurrent rows
        self.rate_qps = rate_qps
        self.max_in_flight = max_in_flight
        self._slots: Optional[asyncio.Semaphore] = None  # made on the actor's loop, at first use
        self._next_slot = 0.0

    async def _pace(self) -> None:
        if not self.rate_qps:
            return
        now = time.monotonic()
        slot = max(now, self._next_slot)
        self._next_slot = slot + 1.0 / self.rate_qps
        if slot > now:
            await asyncio.sleep(slot - now)

    async def _one(self, row: Dict[str, Any]) -> Dict[str, Any]:
        if self.max_in_flight:
            if self._slots is None:
                self._slots = asyncio.Semaphore(self.max_in_flight)
            async with self._slots:
                return await self._send(row)
        return await self._send(row)

    async def _send(self, row: Dict[str, Any]) -> Dict[str, Any]:
        idx = row[self.IDX_IN_BATCH_COLUMN]
        await self._pace()  # after taking a slot: waiting rows do not hold rate slots
        try:
            async for out in HttpRequestUDF.udf(self, [row]):
                return {self.IDX_IN_BATCH_COLUMN: idx, **parse_completion(out["http_response"])}
            return {self.IDX_IN_BATCH_COLUMN: idx, **_error_row("no response")}
        except Exception as e:  # noqa: BLE001 - recorded on the row, counted by the caller
            return {self.IDX_IN_BATCH_COLUMN: idx, **_error_row(_short(e))}

    async def udf(self, batch: List[Dict[str, Any]]) -> AsyncIterator[Dict[str, Any]]:
        for fut in asyncio.as_completed([self._one(r) for r in batch]):
            yield await fut
