"""Pull-mode agents: protocol, server side and the ``certctl agent`` client."""
