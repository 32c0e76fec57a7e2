"""hsmdifd: lifecycle, configuration, timing, systemd, identity."""
