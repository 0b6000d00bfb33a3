"""The OpenAI ingress handed to `build_openai_app`: Ray's `OpenAiIngress`, plus

- OpenAI-style errors where Ray's leaves a gap: an unknown model is a FastAPI HTTPException whose
  body is `{"detail": ...}`, and `"messages": null` passes validation and fails with a 500;
- an optional API key. Ray Serve LLM has no key option, and Serve removed proxy middlewares in
  favour of the ingress's FastAPI app, so every route gets a FastAPI dependency that checks
  `Authorization: Bearer <key>` before the body is read. Only the key's SHA-256 reaches the
  replica (inside the pickled class), never the key itself.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations at runtime.

import functools
import hashlib
import hmac
import inspect
from typing import Optional

from fastapi import Depends, HTTPException, Request
from ray.llm._internal.serve.core.configs.openai_api_models import (ChatCompletionRequest,
                                                                    OpenAIHTTPException)
from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS
from ray.serve.llm.ingress import OpenAiIngress
from starlette.responses import JSONResponse, Response

from rdistill.serve.warmup import Readiness, drain, warmup_request


def _error(status: int, message: str, kind: str) -> OpenAIHTTPException:
    return OpenAIHTTPException(status_code=status, message=message, type=kind, internal_message=message)


LOADING = "the model is still loading; poll /v1/models until it answers 200"


def _loading() -> JSONResponse:
    """The 503 of a model still loading, returned rather than raised: it is an answer, not a
    failure, so Ray's error path (which logs every raised error with its traceback, once per
    poll) never sees it; Serve's access log still has its one line (`GET /v1/models 503`)."""
    return JSONResponse({"error": {"message": LOADING, "type": "ServiceUnavailableError", "code": 503}},
                        status_code=503, headers={"Retry-After": "2"})


async def _messages_must_be_a_list(request: Request) -> None:
    """Runs before body validation: vLLM's request model iterates `messages` in a validator, so
    a null there raises TypeError, which Ray answers with a 500."""
    try:
        body = await request.json()
    except ValueError:
        return  # malformed JSON: FastAPI answers 400 itself
    if isinstance(body, dict) and "messages" in body and not isinstance(body["messages"], list):
        raise _error(400, "messages must be a non-empty list of {role, content} objects",
                     "BadRequestError")


class RdistillIngress(OpenAiIngress):
    """Ray's ingress with OpenAI-style errors and a readiness gate: `/v1/models` answers 503
    until the model has answered a request through this ingress (see rdistill.serve.warmup)."""

    _readiness: Optional[Readiness] = None

    def _ready(self) -> bool:
        if not self._model_cards:
            return True  # nothing to wait for
        if self._readiness is None:
            self._readiness = Readiness()
        if not self._readiness.ready:
            model = next(iter(self._model_cards))
            self._readiness.start(lambda: drain(self._get_response(body=warmup_request(model),
                                                                   call_method="chat")), f"model {model}")
        return self._readiness.ready

    async def check_health(self):
        self._ready()  # start the warm-up as soon as Serve looks at this replica

    async def models(self):
        if not self._ready():
            return _loading()
        return await super().models()

    async def model_data(self, model: str):
        if not self._ready():
            return _loading()
        return await super().model_data(model)

    async def _get_model_id(self, model: Optional[str]) -> str:
        try:
            return await super()._get_model_id(model)
        except HTTPException as e:  # FastAPI would answer {"detail": ...}, not an OpenAI error
            raise _error(e.status_code, str(e.detail), "NotFoundError" if e.status_code == 404
                         else "BadRequestError") from None

    async def chat(self, body: ChatCompletionRequest, request: Request,
                   _checked: None = Depends(_messages_must_be_a_list)) -> Response:
        return await super().chat(body, request)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _with_dependency(method, dependency):
    """`method` with an extra keyword-only FastAPI dependency that runs before it."""

    @functools.wraps(method)
    async def guarded(self, *args, _authorized: None = None, **kwargs):
        return await method(self, *args, **kwargs)

    # FastAPI solves dependencies in signature order: put this one first, right after self
    # (all keyword-only, as Serve makes them anyway), so it runs before any other check.
    self_param, *rest = inspect.signature(method).parameters.values()
    kw = inspect.Parameter.KEYWORD_ONLY
    first = inspect.Parameter("_authorized", kw, default=Depends(dependency), annotation=None)
    guarded.__signature__ = inspect.signature(method).replace(
        parameters=[self_param, first, *(p.replace(kind=kw) for p in rest)])
    return guarded


def ingress_class(key_sha256: Optional[str] = None) -> type:
    """`RdistillIngress`, or (with a key digest) a subclass whose every route answers 401 unless
    the request's bearer key hashes to `key_sha256`."""
    if key_sha256 is None:
        return RdistillIngress

    async def authorize(request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = hashlib.sha256(token.strip().encode()).hexdigest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, key_sha256):
            raise _error(401, "Missing or incorrect API key: send the header "
                              "'Authorization: Bearer <key>'.", "invalid_api_key")

    routes = {name: _with_dependency(getattr(RdistillIngress, name), authorize)
              for name in DEFAULT_ENDPOINTS}
    return type("BearerAuthIngress", (RdistillIngress,), routes)
