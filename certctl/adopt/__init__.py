"""Adopting discovered and imported certificates into the inventory and state."""
