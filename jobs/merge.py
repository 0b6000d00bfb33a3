"""`python jobs/merge.py CONFIG.yml OUT_DIR`: the mergekit-yaml drop-in as a file; the same as
`rdistill merge ...` (see rdistill/cli/merge.py)."""

import sys

from rdistill.cli.merge import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
