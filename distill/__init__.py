"""Core library of the distillation pipeline: no Prefect, no DVC, no side effects at import."""
