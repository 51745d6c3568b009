"""Built-in certctl connectors (installed as ``certctl_connectors``)."""
