"""hsmdifd: the engine child and its supervisor, llama.cpp RPC, the data-plane relays."""
