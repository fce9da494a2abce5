"""Data: MetaICL-format task files and the built-in synthetic suite."""
