"""rdistill's entry point: run the Branch-Merge pipeline's stages in order.

    python jobs/run.py                                  # the toy world, end to end
    python jobs/run.py stages=[generate,verify] run_dir=runs/exp1 generate.sampling.n=4
    python jobs/run.py experiment=tinyr1_32b dry_run=true
    ray job submit --working-dir . -- python jobs/run.py experiment=...

Overrides are Hydra's (key=value, group=option, +new=value); see conf/ and README.md.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        from dataclasses import fields

        from rdistill.config import ExperimentConfig
        print("top-level keys:", ", ".join(f.name for f in fields(ExperimentConfig)))
        return 0
    from rdistill.config import ConfigError
    from rdistill.log import setup
    log = setup()
    try:
        from compose import load
        cfg = load(argv)
        from rdistill.dryrun import print_plan
        if cfg.dry_run:
            print_plan(cfg)
            return 0
        from rdistill.pipeline import run_pipeline
        from rdistill.topology import init_ray
        init_ray(cfg.ray)
        try:
            run_pipeline(cfg)
            from rdistill.report.stage import table_from_report
            table = table_from_report(os.path.join(cfg.run_dir, "report", "report.md"))
            if table:  # the run ends with the TinyR1-style table
                print(f"\n{table}\n(full report: {os.path.join(cfg.run_dir, 'report', 'report.md')})")
        finally:
            import ray
            ray.shutdown()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        log.info("interrupted; rerun the same command to resume where it stopped")
        return 130
    return 0


if __name__ == "__main__":  # vLLM spawns workers: engine-building code must sit behind this guard
    sys.exit(main(sys.argv[1:]))
