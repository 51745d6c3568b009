"""JSON Schemas of the inventory kinds and of the plan (installed as ``certctl_schemas``)."""
