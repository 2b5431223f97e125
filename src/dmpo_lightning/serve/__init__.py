"""Serving an artefact: over HTTP with requests pooled per exit stage, or one Ray deployment per stage.

- ``dmpo serve ARTEFACT`` / ``dmpo serve ARTEFACT``
  (:func:`dmpo_lightning.serve.cli.main`): LitServe, extra ``[serve]``.
- :mod:`dmpo_lightning.serve.ray_app`: Ray Serve application, extra ``[ray]``.
- :mod:`dmpo_lightning.serve.payload` and :mod:`dmpo_lightning.serve.batcher`: what a request may hold and
  the batch-filling engine over requests (no web framework imported).

docs/serve.md has the endpoints, the options, the cluster setup and the measured throughput.
"""
