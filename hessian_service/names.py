"""What a model's name, version and ``name@version`` reference may look like.

One place for the patterns that manifests, request bodies and URL paths are checked
against, so that a reference the registry could never hold (``quadratic4@``, ``../x``)
is refused where it arrives, naming the field, instead of being resolved to something.
"""

from __future__ import annotations

_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
_VERSION = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}"

NAME_PATTERN = rf"^{_NAME}$"
VERSION_PATTERN = rf"^{_VERSION}$"
FILE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
# ``name`` (its latest version) or ``name@version``; ``name@`` is neither.
REF_PATTERN = rf"^{_NAME}(@{_VERSION})?$"
