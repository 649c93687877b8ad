"""Trace replay: the cache controller and policies driven by a recorded trace on a virtual clock."""
