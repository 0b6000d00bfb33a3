"""Run the Branch-Merge pipeline's stages in order.

    rdistill run                                        # the toy world, end to end
    rdistill run stages=[generate,verify] run_dir=runs/exp1 generate.sampling.n=4
    rdistill run experiment=tinyr1_32b dry_run=true
    rdistill run --help merge.search                    # the settings of one group, documented
    ray job submit --working-dir . -- python jobs/run.py experiment=...   (the same command)

Overrides are Hydra's (key=value, group=option, +new=value); see conf/ and README.md.
"""

from __future__ import annotations

import os
import sys


def print_help(argv: list[str]) -> int:
    """`--help`: the usage and every top-level setting; `--help KEY`: the settings under KEY
    (a group such as merge, train, merge.search, domains.math), each with its docstring."""
    from rdistill.config import ExperimentConfig
    from rdistill.config.docs import describe, resolve_key
    keys = [a for a in argv if a not in ("-h", "--help") and "=" not in a]
    if not keys:
        print(__doc__)
        print(describe(ExperimentConfig))
        return 0
    for key in keys:
        try:
            cls, _ = resolve_key(ExperimentConfig, key)
        except KeyError as e:
            print(f"error: {e.args[0]}", file=sys.stderr)
            return 2
        print(describe(cls, key.rstrip(".") + "."))
    return 0


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        return print_help(argv)
    from rdistill.log import log_to_file, setup
    log = setup()
    try:
        from rdistill.cli.compose import load
        cfg = load(argv)
        if cfg.dry_run:
            from rdistill.dryrun import print_plan
            print_plan(cfg)
            return 0
        # The output folders first, before the stages' imports, the log file, the watchdog and Ray:
        # a run_dir that cannot be used is one line within a second and leaves nothing behind.
        from rdistill.outputs import check_outputs
        check_outputs(cfg, lambda: _disk_need(cfg))
        log_file = log_to_file(cfg.run_dir)
        from rdistill.log import native_stderr_to_log, quiet_console
        quiet_console(cfg.verbose)
        native_stderr_to_log()  # Ray's C++ and vLLM's native lines: the run log, not the console
        return run(cfg, log, log_file)
    except KeyboardInterrupt:
        log.info("interrupted; rerun the same command to resume where it stopped")
        return 130
    except BaseException as e:  # noqa: BLE001 (expected failures print one line; bugs keep their traceback)
        return fail(e, log)
    finally:
        from rdistill.log import restore_native_stderr
        from rdistill.progress import close_all
        close_all()  # a bar left on the terminal by a failed stage
        restore_native_stderr()


def _disk_need(cfg) -> float:
    from rdistill.pipeline import stages_to_run
    from rdistill.preflight import disk_need
    from rdistill.rundir import RunDir
    return disk_need(cfg, stages_to_run(cfg, RunDir(cfg.run_dir)))


def run(cfg, log, log_file) -> int:
    from rdistill.pipeline import run_pipeline
    from rdistill.topology import vllm_ipc_dir
    from rdistill.watchdog import watch_run
    ipc, owned = vllm_ipc_dir()  # where every engine of this run puts its sockets
    with watch_run(cfg.run_dir, remove=[ipc] if owned else []):  # engines die with the run, even on kill -9
        try:
            run_pipeline(cfg)
            from rdistill.report.stage import table_from_report
            table = table_from_report(os.path.join(cfg.run_dir, "report", "report.md"))
            if table:  # the run ends with the TinyR1-style table
                print(f"\n{table}\n(full report: {os.path.join(cfg.run_dir, 'report', 'report.md')})")
        finally:
            import ray
            ray.shutdown()
    if log_file:
        log.debug("run finished; log: %s", log_file)
    return 0


def fail(e: BaseException, log) -> int:
    """One line on stderr for the project's expected failures (and a full disk); the traceback
    goes to the run's log file. Anything else is a bug: its traceback is printed as well."""
    import errno
    import traceback

    from rdistill.errors import expected_error
    from rdistill.log import log_file_path
    known = expected_error(e)
    where = log_file_path()
    if where:
        try:
            with open(where, "a") as f:
                traceback.print_exception(e, file=f)
        except OSError:  # the disk the log lives on may be the full one
            where = None
    if known is None and isinstance(e, OSError) and e.errno == errno.ENOSPC:
        print(f"error: out of disk space writing {e.filename or 'the run directory'}: free space or point "
              "run_dir at a larger disk", file=sys.stderr)
        return 1
    if known is None:
        if isinstance(e, SystemExit):
            raise e
        traceback.print_exception(e)
        print(f"error: unexpected {type(e).__name__} (a bug; please report it with the traceback above"
              f"{f' and {where}' if where else ''})", file=sys.stderr)
        return 1
    msg = " ".join(str(known).split())  # one line, whatever the raiser put in it
    print(f"error: {msg}" + (f" (details: {where})" if where and known.exit_code != 2 else ""), file=sys.stderr)
    return known.exit_code
