"""The KV store's contract: what the store (``kvstore``) and its clients
(``services``) must agree on, in one place that both import, so that neither
imports the other's internals.

* ``checksum``: ``crc32`` of block payloads (the fastest implementation at hand);
* ``wire``: the hand-written codec of the bulk gRPC messages (PutChunk, BlockData);
* ``errors``: the error types a client sees, one per store status;
* ``arena``: the header of the store's shared-memory arena.

The messages themselves are the protos (``splitserve.v1.kvstore_pb2``). The
direction of imports is one way: ``kvstore`` builds on ``services`` (this contract,
the data plane, the common server pieces); nothing in ``services`` or ``gateway``
imports ``kvstore`` (a unit test keeps it so).
"""
