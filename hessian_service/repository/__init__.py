"""Model lifecycle: loading, checking, probing and keeping the models the service serves.

A regular package (not a namespace directory) so that import-linter and grimp see its modules.
"""
