"""Task -> diffusers pipeline (`tasks`), loading with switches (`loading`), tiny pipelines (`tiny`).

Submodules are imported where used: `tasks` stays light so configs can validate task names
without importing diffusers.
"""

import logging


class _TorchvisionFallbackFilter(logging.Filter):
    """transformers warns, in every process that imports a pipeline, that it uses the PIL image
    processors because torchvision is missing; torchvision does not install beside this torch,
    so the fallback is the setup, not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackFilter())
