"""Planners for the multi-agent driving env: MAPPO/IPPO (torch) and the intent-sharing and
safety modules (numpy only, so the env in ``sim/env.py`` can use them without torch)."""
