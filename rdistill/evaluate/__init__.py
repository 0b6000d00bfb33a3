"""The evaluate stage: every model of the run scored on each domain's test split (pass@1 over n
samples, with a standard error), and the merge candidates compared on the dev split."""
