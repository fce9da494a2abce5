"""Serving generated prompts (issue 16): the prompt store, per-row prompt scoring and generation
in batched jitted calls, and the HTTP service (serve.py)."""
