"""Runnable anchorscan pipelines and their options."""
