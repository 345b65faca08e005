"""The cache transfer: `base` (the interface every backend implements, and a fake), `machine` (the factory
that picks the same-machine backend from `pdpipe.ipc` or the cross-machine one from `pdpipe.rdma`), and
`worker` (the transfer process's jobs)."""
