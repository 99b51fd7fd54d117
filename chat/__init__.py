"""A small, secure, authenticated chat service over TLS (protocol v1)."""

__version__ = "0.1.0"
SERVER_NAME = "chat"
