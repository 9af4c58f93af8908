"""Python client for hessian-service: one call, one tensor.

```python
from hessian_client import Client

H = Client("http://127.0.0.1:8000").hessian("digits_cnn", x, output_index=2)
```

Depends on httpx and numpy only. Results are ``torch.Tensor`` (torch is the optional
extra ``hessian-client[torch]``), or numpy arrays with ``as_numpy=True``; asking for a
tensor without torch installed raises ``TorchNotInstalledError`` before anything is
sent. ``Client.bulk_hessian`` streams many Hessians to a file (numpy only);
``Client.submit`` runs a request as a job on the server (``Job.wait`` shows its
progress); ``Client.hvp``/``jvp``/``vjp``, ``hessian_diagonal``, ``hessian_trace`` and
``hessian_eigen`` call the matrix-free operators (typed results: ``ProductResult``,
``Estimate``, ``Eigenpairs``, numpy arrays); ``AsyncClient`` is the asyncio twin; every
failure is a ``HessianServiceError``.
"""

from hessian_client._arrays import Result, TorchNotInstalledError
from hessian_client._retry import RetryPolicy
from hessian_client._wire import HessianServiceError
from hessian_client.client import AsyncClient, Client
from hessian_client.jobs import Job, JobResult
from hessian_client.operators import Eigenpairs, Estimate, OperatorResult, ProductResult
from hessian_client.packing import unpack

__all__ = [
    "AsyncClient",
    "Client",
    "Eigenpairs",
    "Estimate",
    "HessianServiceError",
    "Job",
    "JobResult",
    "OperatorResult",
    "ProductResult",
    "Result",
    "RetryPolicy",
    "TorchNotInstalledError",
    "unpack",
]
