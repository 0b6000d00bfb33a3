"""`rdistill`: the project's console script (pyproject's [project.scripts]).

    rdistill run [OVERRIDE ...]          the pipeline (jobs/run.py is the same command for ray job submit)
    rdistill run --help [KEY ...]        every setting, or those under KEY, with their documentation
    rdistill merge CONFIG.yml OUT_DIR    a mergekit YAML, merged by rdistill (mergekit-yaml's drop-in)
    rdistill serve MODEL [--name ...]    one model behind an OpenAI-compatible API
"""

from __future__ import annotations

import sys

COMMANDS = {"run": "rdistill.cli.run", "merge": "rdistill.cli.merge", "serve": "rdistill.serve.__main__"}


def main(argv: list[str] | None = None) -> int:
    import importlib
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"error: unknown command {cmd!r}: use one of {', '.join(COMMANDS)} (rdistill --help)", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[cmd])
    return getattr(module, "entry", module.main)(rest)  # entry: a command that exits by itself


if __name__ == "__main__":  # vLLM spawns workers: engine-building code must sit behind this guard
    sys.exit(main())
