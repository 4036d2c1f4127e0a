"""opd's work: config, rollout, scoring, losses, training, evaluation, engines and the toy world.

Import-light on purpose: nothing here imports Prefect or torch at package import time.
"""
