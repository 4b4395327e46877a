"""Prefect tasks, one per DVC stage (installed as ``cogalign.tasks``)."""
