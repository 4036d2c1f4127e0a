"""Prefect flows of opd (orchestration only) and the `opd` CLI.

Defaults for Prefect's embedded (ephemeral) API, set before Prefect is imported: its temporary
server takes 12-60 s to start on a busy small machine (Prefect's own default timeout is shorter),
and anonymous analytics off (its first start otherwise races on the SQLite database).
Any value already in the environment wins.
"""
import os

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
