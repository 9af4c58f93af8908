"""Request handling: checks, operations, batching and merging over the repository and engine.

A regular package (not a namespace directory) so that import-linter and grimp see its modules.
"""
