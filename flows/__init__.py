"""Prefect flows (the pipeline, calibration, schedules) and the ``distill`` command line."""
