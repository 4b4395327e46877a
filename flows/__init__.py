"""Prefect flows (installed as ``cogalign.flows``)."""
