"""Builders for the demo/bench crawl and the held-out target tasks.

Every source is a package from a public registry (apt, npm, PyPI). Archives are cached under
``.dsdm/cache/sources/`` and read in place, so re-runs are offline and byte-identical.
"""
