"""hsmdifd: the control and peer services, root-or-forward, the HTTP API."""
