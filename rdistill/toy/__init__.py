"""The toy world: synthetic math, code and science domains (domains.py), a tokenizer trained on
them (tokenizer.py), tiny Qwen2 models (model.py), the recipe that builds the teacher and the
student base (build.py), their pass@1 through vLLM (measure.py), and the `toy` stage (stage.py).
The built models ship in assets/."""
