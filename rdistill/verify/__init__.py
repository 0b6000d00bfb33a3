"""Verification of teacher answers (math-verify, sandboxed code, multiple choice) and the filters
that turn generated rows into one SFT set per domain."""
