"""``conveyor demo``: a busy hour of a SaaS backend, compressed to minutes, on real services.

The orchestrator (``run``) starts private Redis and PostgreSQL when none is given, the local
services the handlers talk to (``services``: an SMTP server and a flaky webhook endpoint;
``dataset``: tables to export), and real worker processes (``fleet``). It plays the
``scenario``, breaks workers midway, then proves from an independent ``ledger`` that no job was
lost (``accounting``) and prints the ``report``. The worker processes import ``handlers``.
"""
