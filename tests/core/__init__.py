"""Tests of the manager's core (issue 15).

* ``test_*_regressions.py`` — one small deterministic test per numbered failure of the
  issue (``test_01_…`` to ``test_18_…``), plus head-of-line blocking, starvation and stale
  observations.  Each failed on the manager before the core rebuild, for the reason the
  issue gives.
* ``test_stateful.py`` — a hypothesis state machine driving the manager against
  :class:`modelmora.testing.faulty.FaultyProvider`; short in the default run,
  ``MODELMORA_STATEFUL_STEPS=20000 python -m pytest -m soak tests/core/test_stateful.py``
  for the soak job.
* ``test_faulty.py`` — the fault-injecting runtime itself.
"""
