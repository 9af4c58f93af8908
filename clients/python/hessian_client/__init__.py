"""Python client for hessian-service: one call, one tensor.

```python
from hessian_client import Client

H = Client("http://127.0.0.1:8000").hessian("digits_cnn", x, output_index=2)
```

Depends on httpx and numpy only; results are ``torch.Tensor`` when torch is installed
(numpy arrays with ``as_numpy=True``). ``Client.bulk_hessian`` streams many Hessians to a
file; ``AsyncClient`` is the asyncio twin; every failure is a ``HessianServiceError``.
"""

from hessian_client._retry import RetryPolicy
from hessian_client._wire import HessianServiceError
from hessian_client.client import AsyncClient, Client, Result

__all__ = ["AsyncClient", "Client", "HessianServiceError", "Result", "RetryPolicy"]
