"""Defaults shared by the operator's spec and the worker's app args.

This module is the one place these numbers live: ``spec.ServeSpec`` and
``spec.RestartPolicySpec`` use them as field defaults, and ``dsi_worker.config.AppArgs``
uses the same values, so a worker started without the operator (``make serve-local``)
behaves like one the operator rendered. It imports nothing, so the worker can import it
without pulling in kopf or the kubernetes client.
"""

from __future__ import annotations

MAX_BATCH_SIZE = 8
BATCH_WAIT_TIMEOUT_MS = 10
MAX_NEW_TOKENS = 512
REQUEST_TIMEOUT_SECONDS = 300
FORMATION_TIMEOUT_SECONDS = 900
# A rank still inside a collective step this long after a peer finished it is wedged
# (dsi_worker.formation); also how long a rank may stop answering.
WEDGE_TIMEOUT_SECONDS = 45
