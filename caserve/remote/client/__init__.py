"""What runs on the CPU node: the ``caserve`` torch device (:mod:`.device`), client tensors
(:mod:`.tensor`), the connection's session (:mod:`.session`: op buffer, handles, syncs), op dispatch
(:mod:`.dispatch`) and the meta plans it caches per op signature (:mod:`.planner`), graph mode
(:mod:`.graph`) and captured steps (:mod:`.capture`), and the plain data the last three share
(:mod:`.records`). Imports :mod:`caserve.remote.wire`, never the server."""
