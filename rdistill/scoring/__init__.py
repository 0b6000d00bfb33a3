"""Judging answers, shared by verify, evaluate and the merge search: the verifiers (math-verify,
the code sandbox, option letters), the code sandbox itself, and pass@k with standard errors."""
