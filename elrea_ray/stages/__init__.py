"""One module per pipeline stage, each with a `run(ctx) -> dict` over the run directory.

    data -> base -> gradients -> clusters -> experts (+ bundle.json) -> baselines -> evaluate

`elrea_ray/pipeline.py` runs them in that order; a stage reads only what earlier stages wrote.
"""
