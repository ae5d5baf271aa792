"""The container job: ``python -m job`` runs queued work on the GPU (or CPU) with the shared library."""
