"""Ask models and judge their answers: rows through warm engines (rdistill.llm.warm), then the
verifiers over the answers in parallel Ray Data tasks. Shared by the evaluate stage (every model
of a run) and the merge search (candidates on growing shares of the dev split)."""

from __future__ import annotations

from typing import Iterator

from rdistill.config import SandboxConfig
from rdistill.llm.spec import LLMSpec
from rdistill.llm.warm import WarmPool
from rdistill.scoring.verifiers import score_dataset


def answer_and_score(pool: WarmPool, items: list[tuple[LLMSpec, list[dict]]], sandbox: SandboxConfig
                     ) -> Iterator[tuple[LLMSpec, object, dict]]:
    """For each (spec, rows): the rows answered by spec's model and scored, as a pandas frame
    (every row field plus completion, finish_reason, token counts, correct, reason, extracted,
    infra), with the engine's info (how the model was loaded, seconds); in finishing order.
    A model's answers are scored in a thread of their own while the engines go on with the next
    models (scoring code runs sandboxed programs: as long as generating, on the toy)."""
    import concurrent.futures as cf

    import ray
    specs = {id(spec): (spec, rows) for spec, rows in items}
    jobs = [dict(spec.engine_job(rows), key=id(spec)) for spec, rows in items]

    def score(spec: LLMSpec, rows: list[dict], answers: list[dict], info: dict):
        by_id = {a["id"]: a for a in answers}
        done = [{**r, **by_id[r["id"]]} for r in rows]
        ds = ray.data.from_items(done, override_num_blocks=max(1, min(8, len(done) // 64)))
        return spec, score_dataset(ds, sandbox).to_pandas(), info

    with cf.ThreadPoolExecutor(max_workers=2, thread_name_prefix="score") as ex:
        pending = []
        for job, answers, info in pool.generate(jobs):
            spec, rows = specs[job["key"]]
            pending.append(ex.submit(score, spec, rows, answers, info))
            done = [f for f in pending if f.done()]
            for f in done:
                pending.remove(f)
                yield f.result()
        for f in cf.as_completed(pending):
            yield f.result()
