"""The device the API and end-to-end tests run the service on.

``cpu`` unless ``HESSIAN_TEST_DEVICE`` names another (``cuda`` in bench/gpu_check.sh);
CI has no GPU, so everything must pass on the CPU.
"""

from __future__ import annotations

import os
from typing import Literal, cast

TEST_DEVICE = cast(Literal["cpu", "cuda"], os.environ.get("HESSIAN_TEST_DEVICE", "cpu"))
