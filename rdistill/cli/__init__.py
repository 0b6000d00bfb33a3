"""The command line: `rdistill run` (the pipeline, Hydra overrides), `rdistill merge` (the
mergekit-yaml drop-in), `rdistill serve` (one model behind the OpenAI API). Hydra lives in this
layer (rdistill.cli.compose) and in conf/; the stages take plain dataclasses."""
