"""The PostgreSQL job queue, ``certctl worker`` and leader election."""
