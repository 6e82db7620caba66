"""Keeps icomm master data in step with Hermes e-commerce sites, as a Dagster code location."""
