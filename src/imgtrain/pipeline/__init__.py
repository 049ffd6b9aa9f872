"""Pipelines as code: a YAML file of steps (imgtrain's modules) wired by bindings, as Azure ML's v2 jobs."""
