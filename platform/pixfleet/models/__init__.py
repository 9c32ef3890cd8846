"""Task -> diffusers pipeline (`tasks`), loading with switches (`loading`), tiny pipelines (`tiny`).

Submodules are imported where used: `tasks` stays light so configs can validate task names
without importing diffusers.
"""
