"""Plain-Python renderings of what mlutils replaces: the oracles of tests/ and
the baselines of bench/ (see README.md here).  Not part of the package."""
