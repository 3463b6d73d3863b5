"""The worker process: its settings (:mod:`.config`, light: no torch), device choice, registration and
reconnection (:mod:`.worker`), batched execution on a loaded model (:mod:`.engine`) and sampling
(:mod:`.sampling`). Never imports the router package."""
