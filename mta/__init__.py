"""A mail transfer agent on Twisted whose TLS a postmaster can trust and
control."""

__version__ = "0.1.0"
