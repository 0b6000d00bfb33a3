"""Prompt sources shared by the stages: records from local files or Hugging Face datasets
(`sources`, reading in `read`, filters in `filters`, LiveCodeBench records in `lcb`, existing
teacher traces in `traces`), evaluation sets (`evalsets`: test sets, dev disjoint from test) and
evaluation rows (a split's prompts as chat rows, n samples each: `eval_rows`)."""
