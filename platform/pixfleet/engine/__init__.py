"""The per-row engine that generation (Ray Data), serving (Ray Serve) and training (Ray Train)
stand on: row columns, parameters and seeds, image decoding and fitting, the pipeline runner.

It imports neither Ray nor MLflow, so it runs in a bare process with torch and diffusers alone
(a serving replica's engine process, a GPU machine without Ray).
"""
