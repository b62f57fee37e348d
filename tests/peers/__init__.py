"""Real peers on loopback for integration tests: DNS, SMTP, Postfix."""
