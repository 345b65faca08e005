"""Same-machine KV transfer: shared memory on CPU, CUDA IPC handles and peer copies on GPU."""
