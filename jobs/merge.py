"""`python jobs/merge.py CONFIG.yml OUT_DIR`: the mergekit-yaml drop-in as a file; the same as
`rdistill merge ...` (see rdistill/cli/merge.py)."""

from rdistill.cli.merge import entry

if __name__ == "__main__":
    entry()
