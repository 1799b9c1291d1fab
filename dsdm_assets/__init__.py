"""Dagster layer: thin assets over the ``dsdm`` engine, grouped by stage of the method."""
