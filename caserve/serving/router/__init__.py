"""The router process: public OpenAI routes (:mod:`.api`, :mod:`.schemas`), queues and worker sessions
(:mod:`.router`, :mod:`.jobs`), dispatch policies (:mod:`.policies`), the router side of the worker
channel (:mod:`.worker_api`) and metrics (:mod:`.metrics`). Never imports the worker package."""
