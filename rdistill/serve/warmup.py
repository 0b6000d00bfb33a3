"""Ready means ready: a served model says so only after it has answered real requests.

Seen here: `/v1/models` answered about 60 s before the model could generate, and the first
requests sent then took about 50 s each. Two pieces close that gap:
- `WarmLLMServer`, the LLM replica class: after its engine starts, it answers a few small chat
  requests itself before its constructor returns, so Serve neither reports the replica ready
  nor routes traffic to it (an autoscaled replica included) before the engine has run;
- `Readiness`, used by the ingress: `/v1/models` answers 503 until a request sent through the
  ingress's own handle to the model has come back, so a client or a load balancer that polls
  it sees "not ready" until the whole path answers, and the first real requests see the same
  latency as later ones.
"""

import asyncio
import logging
from typing import Any, Awaitable, Callable, Optional

from ray.llm._internal.serve.core.configs.openai_api_models import ChatCompletionRequest, ErrorResponse
from ray.llm._internal.serve.core.server.llm_server import LLMServer

log = logging.getLogger("ray.serve")

WARMUP_REQUESTS = 4  # at once: the engine's batched path runs too, not just a single sequence
WARMUP_TOKENS = 8


def warmup_request(model: str) -> ChatCompletionRequest:
    return ChatCompletionRequest(model=model, messages=[{"role": "user", "content": "Hello"}],
                                 max_tokens=WARMUP_TOKENS, temperature=0.0, stream=False)


async def drain(result: Any) -> None:
    """Consume one response (an async generator, or an awaitable of one); raise on an error body."""
    if asyncio.iscoroutine(result):
        result = await result
    async for chunk in result:
        first = chunk[0] if isinstance(chunk, list) and chunk else chunk
        if isinstance(first, ErrorResponse):
            raise RuntimeError(first.error.message)


async def warm_until_answered(send: Callable[[], Awaitable[None]], what: str, wait_s: float = 2.0) -> None:
    """Send WARMUP_REQUESTS requests at once until all of them come back."""
    tries = 0
    while True:
        tries += 1
        try:
            await asyncio.gather(*(send() for _ in range(WARMUP_REQUESTS)))
            log.info("rdistill: %s warmed up (%d request(s) answered, try %d)", what, WARMUP_REQUESTS, tries)
            return
        except Exception as e:  # noqa: BLE001 (not ready yet: any failure means try again)
            log.info("rdistill: %s not ready yet (%s); retrying", what, e)
            await asyncio.sleep(wait_s)


class WarmLLMServer(LLMServer):
    """An LLM replica that is constructed (and so ready for traffic) only once it has generated."""

    async def start(self):
        await super().start()
        model = self._llm_config.model_id
        await warm_until_answered(lambda: drain(self.chat(warmup_request(model))), f"replica of {model}")


class Readiness:
    """The ingress's view: ready once a request through its handle to the model came back."""

    def __init__(self) -> None:
        self.ready = False
        self._task: Optional[asyncio.Task] = None

    def start(self, send: Callable[[], Awaitable[None]], what: str) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(send, what))

    async def _run(self, send, what: str) -> None:
        await warm_until_answered(send, what)
        self.ready = True
