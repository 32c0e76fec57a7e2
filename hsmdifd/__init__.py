"""hsmdifd: the HSM-DIF daemon."""

__version__ = "0.1.0"
