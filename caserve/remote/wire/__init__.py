"""What crosses the network between a CPU node and a GPU server: framing, message structs, the version
and limits (:mod:`.protocol`), the torch vocabulary both ends share (:mod:`.codec`), sockets
(:mod:`.transport`) and the typed errors (:mod:`.errors`). Imports neither side."""
