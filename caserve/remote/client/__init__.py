"""What runs on the CPU node: the ``caserve`` torch device (:mod:`.device`), client tensors
(:mod:`.tensor`), the connection's session (:mod:`.session`), op dispatch (:mod:`.dispatch`) and graph
mode (:mod:`.graph`, :mod:`.capture`). Imports :mod:`caserve.remote.wire`, never the server."""
