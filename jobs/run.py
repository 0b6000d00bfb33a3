"""The pipeline's entry point as a file, for `ray job submit -- python jobs/run.py ...` and
`python jobs/run.py ...`; the same as `rdistill run ...` (see rdistill/cli/run.py)."""

import sys

from rdistill.cli.run import main

if __name__ == "__main__":  # vLLM spawns workers: engine-building code must sit behind this guard
    sys.exit(main(sys.argv[1:]))
