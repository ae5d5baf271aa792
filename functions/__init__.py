"""Function app entry points: one module per trigger, each thin; the logic lives in ``shared``."""
