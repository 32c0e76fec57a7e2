"""hsmdifd: discovery, membership, proofs and TLS, election, policy, the cluster view."""
