"""hsmdifd: GGUF shape, planner, device figures, leases, the model that serves."""
