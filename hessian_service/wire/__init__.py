"""Wire formats: request and response schemas, JSON, base64 and binary codecs (no FastAPI).

A regular package (not a namespace directory) so that import-linter and grimp see its modules.
"""
