"""The OpenAI-compatible app: one model behind Ray Serve LLM (`LLMConfig` + `build_openai_app`).

`deploy(spec)` serves `/v1/models`, `/v1/chat/completions` and `/v1/completions` (streaming and
not) with vLLM; with a reasoning parser, chat answers carry the `<think>` part separately as
`reasoning_content`. Placement comes from `rdistill.topology`, so the same spec runs on CPU
bundles here and on GPUs on a cluster.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from rdistill.config import EngineConfig, ServeConfig
from rdistill.config.fields import ConfigError
from rdistill.log import requiet

log = logging.getLogger("rdistill")

APP_PREFIX = "rdistill-"


@dataclass
class ServeSpec:
    model: str
    """Model directory or Hugging Face model id."""
    served_name: str
    """Model name clients send."""
    device: str = "cpu"
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: int = 16
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: Optional[str] = None
    """Key clients must send as `Authorization: Bearer <key>` (None: no auth)."""
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(max_model_len=1024))
    """Each replica's vLLM engine."""
    reasoning_parser: Optional[str] = "deepseek_r1"

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}/v1"

    @property
    def app_name(self) -> str:
        return APP_PREFIX + self.served_name.replace("/", "--")

    @classmethod
    def from_config(cls, sc: ServeConfig, model: str, served_name: str, device: str,
                    student_len: Optional[int] = None) -> "ServeSpec":
        """The serve section's settings (every field the two share by name), plus the resolved
        model, name, the key read from the environment, and the engine's context (the
        student's when serve.engine leaves it unset)."""
        import dataclasses

        from rdistill.config.fields import shared_fields
        engine = dataclasses.replace(sc.engine, max_model_len=sc.engine.max_model_len or student_len)
        return shared_fields(sc, cls, model=model, served_name=served_name, device=device,
                             api_key=api_key_from_env(sc.api_key_env), engine=engine)


def api_key_from_env(name: Optional[str]) -> Optional[str]:
    """The key named by `serve.api_key_env`; a configured but unset variable is an error, since
    silently serving without auth is the wrong failure."""
    if not name:
        return None
    key = os.environ.get(name, "").strip()
    if not key:
        raise ConfigError(f"serve.api_key_env={name!r} names an unset or empty environment variable: "
                          f"export {name}=<key>, or set serve.api_key_env=null to serve without auth")
    return key


def check_model_dir(model: str) -> None:
    """A local model must be a Hugging Face directory with a chat template, so clients get the
    template the students were trained with rather than a guess."""
    path = Path(model)
    if not path.exists():
        if model.startswith((".", "/", "~")):
            raise ConfigError(f"model {model!r} does not exist: pass a model directory or an HF id")
        return  # a Hugging Face model id: vLLM fetches it and its template
    if not (path / "config.json").exists():
        raise ConfigError(f"model {model!r} is not a Hugging Face model directory (no config.json)")
    tok_cfg = path / "tokenizer_config.json"
    has_template = (path / "chat_template.jinja").exists() or (
        tok_cfg.exists() and json.loads(tok_cfg.read_text()).get("chat_template"))
    if not has_template:
        raise ConfigError(f"model {model!r} has no chat template (tokenizer_config.json or "
                          "chat_template.jinja): save the tokenizer the students were trained with")


def llm_config(spec: ServeSpec):
    """The `ray.serve.llm.LLMConfig` of one served model."""
    from ray.serve.llm import LLMConfig

    from rdistill.topology import engine_placement, runtime_env
    e = spec.engine
    engine = dict(dtype=e.dtype, tensor_parallel_size=e.tensor_parallel_size)
    if e.max_model_len:
        engine["max_model_len"] = e.max_model_len
    if spec.device == "cpu":
        engine["enforce_eager"] = True  # no graph capture on the CPU backend; starts faster
    if spec.reasoning_parser:
        engine["reasoning_parser"] = spec.reasoning_parser
    engine.update(e.engine_kwargs)
    from rdistill.serve.warmup import WarmLLMServer
    return LLMConfig(
        server_cls=WarmLLMServer,  # a replica takes traffic only after it has generated
        model_loading_config=dict(model_id=spec.served_name, model_source=spec.model),
        engine_kwargs=engine,
        placement_group_config=engine_placement(spec.device, e.tensor_parallel_size),
        runtime_env=runtime_env(spec.device, e),
        deployment_config=dict(autoscaling_config=dict(
            min_replicas=spec.min_replicas, max_replicas=spec.max_replicas,
            target_ongoing_requests=spec.target_ongoing_requests)),
    )


def build_app(spec: ServeSpec):
    """The Serve application: `build_openai_app` with rdistill's ingress (OpenAI-style errors
    everywhere, and the API-key check when a key is set)."""
    from ray.serve.llm import build_openai_app
    from rdistill.serve.ingress import ingress_class, key_digest
    cls = ingress_class(key_digest(spec.api_key) if spec.api_key else None)
    return build_openai_app({"llm_configs": [llm_config(spec)], "ingress_cls_config": {"ingress_cls": cls}})


def deploy(spec: ServeSpec, timeout_s: float = 1800.0) -> dict:
    """Deploy (or redeploy) the app on the connected Ray cluster and wait until it answers
    (`timeout_s` bounds the wait for the HTTP route once Serve reports the app running).
    Returns the endpoint's URL, served name and how long it took to come up."""
    from ray import serve
    import ray

    from rdistill.topology import fits, serve_resources
    check_model_dir(spec.model)
    short = fits(serve_resources(spec.device, spec.min_replicas, spec.engine.tensor_parallel_size),
                 ray.cluster_resources())
    if short:  # serve.run waits for replicas with no time limit; say why it may wait forever
        log.warning("serve: the cluster is short of what %d replica(s) need (%s); Serve waits "
                    "for an autoscaler to add it", spec.min_replicas, "; ".join(short))
    t0 = time.time()
    serve.start(http_options={"host": spec.host, "port": spec.port})
    # Serve gives its loggers console handlers as it starts, and Serve LLM's set up their own at
    # import unless Serve's have one: quiet them before the app is built (its deployment options
    # would fill the console) and again once it runs.
    requiet()
    app = build_app(spec)
    log.info("serve: deploying %s as '%s' at %s", spec.model, spec.served_name, spec.url)
    serve.run(app, name=spec.app_name, route_prefix="/", blocking=False)
    requiet()
    wait_ready(spec, timeout_s)
    startup = time.time() - t0
    log.info("serve: '%s' ready at %s after %.0fs", spec.served_name, spec.url, startup)
    return {"url": spec.url, "served_name": spec.served_name, "model": spec.model,
            "startup_s": round(startup, 1), "auth": bool(spec.api_key)}


def wait_ready(spec: ServeSpec, timeout_s: float) -> None:
    """Wait until the app is RUNNING and `/v1/models` lists the model (Serve reports RUNNING
    slightly before the proxy routes to it)."""
    import httpx
    from ray import serve
    headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = serve.status().applications.get(spec.app_name)
        if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"serve: app {spec.app_name} is {status.status}: {status.message}")
        if status is not None and status.status == "RUNNING":
            try:
                r = httpx.get(spec.url + "/models", headers=headers, timeout=10)
                if r.status_code == 200 and any(m["id"] == spec.served_name for m in r.json()["data"]):
                    return
            except httpx.HTTPError:
                pass
        time.sleep(2)
    raise TimeoutError(f"serve: {spec.app_name} was not ready after {timeout_s:.0f}s")


def undeploy(spec: ServeSpec) -> None:
    """Remove this app; shut Serve down when it was the last one."""
    from ray import serve
    serve.delete(spec.app_name)
    if not serve.status().applications:
        serve.shutdown()
