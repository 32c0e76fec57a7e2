"""hsmdifctl: talk to hsmdifd."""
