"""Cross-machine KV transfer on the Mooncake Transfer Engine.

The same calls run over RDMA NICs (`protocol="rdma"`, `device_names` naming the NICs) and over plain
TCP (`protocol="tcp"`). Each machine's transfer process runs one engine, registers the KV pools of
its machine's engines, and publishes (segment, base address, layout) per pool in the registry; a
job writes the request's blocks into the peer's registered pool, layer by layer, coalescing runs of
contiguous blocks into single writes. A tensor-parallel instance has a pool a rank, each published;
between instances of the same heads a rank, each rank's blocks go whole to its peer rank; between
instances of different tensor parallelism (`head_copy_plan`) each block's run of heads is strided in
the pool (a token's heads are contiguous, its next token's follow), so it goes as one write per token
of each block: correct, but many small writes. Writes are submitted (one batch a layer) and a thread waits for
each batch in Mooncake's own wait (every write of it), so the transfer process goes on with other jobs
meanwhile; a job is done when every batch landed, and failed once every batch settled with one failed
(nothing of it still writes). Integer return codes
become `MooncakeError`.

`writes` computes the writes' addresses; `mooncake` is the backend.
"""
