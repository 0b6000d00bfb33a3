"""Serving: a model behind Ray Serve LLM's OpenAI-compatible API (`app`), an optional API key
(`auth`), the pipeline stage (`stage`), a stand-alone CLI (`python -m rdistill.serve`) and a
load test (`loadtest`)."""
