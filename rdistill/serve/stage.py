"""Serve stage: the run's merged model (or any model reference) behind an OpenAI-compatible API.

Blocking (serve.blocking=true): serves in the foreground until Ctrl-C or SIGTERM (what
`ray job stop` sends), then removes the app and returns. Otherwise it deploys and returns; the
endpoint then lives as long as the Ray cluster (on a local cluster started by jobs/run.py,
that is until the job exits, so deploy-and-return is for clusters and Python callers).
"""

from __future__ import annotations

import os
import signal
import threading
import time

from rdistill.log import log
from rdistill.stage_api import Stage, StageContext
from rdistill.serve.app import ServeSpec, deploy, undeploy


def spec_of(ctx: StageContext) -> ServeSpec:
    sc = ctx.cfg.serve
    return ServeSpec.from_config(sc, ctx.model(sc.model), sc.served_name or ctx.cfg.name, ctx.cfg.device,
                                 ctx.cfg.student.max_model_len)


def run(ctx: StageContext) -> dict:
    spec = spec_of(ctx)
    info = deploy(spec)
    if not ctx.cfg.serve.blocking:
        if not (ctx.cfg.ray.address or os.environ.get("RAY_ADDRESS")):
            log.warning("serve: deployed on a local Ray cluster; it stops when this process ends")
        return {**info, "blocking": False}
    t0 = time.time()
    try:
        serve_forever(spec)
    finally:
        undeploy(spec)
        log.info("serve: '%s' stopped after %.0fs", spec.served_name, time.time() - t0)
    return {**info, "blocking": True, "served_s": round(time.time() - t0, 1)}


def serve_forever(spec: ServeSpec) -> None:
    """Block until Ctrl-C or SIGTERM; both end the wait the same way, so shutdown is clean."""
    stop = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    log.info("serve: %s -> '%s' at %s; Ctrl-C to stop", spec.model, spec.served_name, spec.url)
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        log.info("serve: interrupted, shutting down")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


# An action, not an artifact: serve.model may be a path, an HF id or any reference; the stage
# resolves it and says which stage to run when it is missing, so no input is required up front.
STAGE = Stage("serve", run, reads=("serve",), cached=False, engine="serve.engine")
