"""Discovery of certificates in files and on the network."""
