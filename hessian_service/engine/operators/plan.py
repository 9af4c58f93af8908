"""Bytes and products of every operator, estimated from sizes alone, before any work.

One *product* is one Hessian-vector (or Jacobian-vector, vector-Jacobian) product for one
sample: the unit of ``max_products``, of ``Progress`` and of the time a request takes.
Working memory follows ``engine.planner``: a product pushes one tangent through a forward
and a backward pass, about ``SECOND_ORDER_FACTOR`` (first order: ``FIRST_ORDER_FACTOR``)
times the bytes of one pass's activations plus inputs; ``c`` products at once cost ``c``
times that, so the operators run the largest chunks of (sample, vector) pairs the budget
holds, and a smaller budget is slower, never different. What a plan counts:

=========  ======================================  ========================================
kind       products                                bytes (peak working memory)
=========  ======================================  ========================================
hvp        ``B * m`` (m vectors per sample)        one chunk of pairs
jvp, vjp   ``B * m``                               one chunk of pairs (first order)
rows       ``B * r`` (r rows of the Hessian)       one chunk of pairs
diagonal,  dense: ``B * n`` (columns' worth)       one chunk of samples' dense Hessians
trace      hvp-basis: ``B * n``                    one chunk of pairs
           stochastic: ``B * m``                   one chunk of pairs + the sketch (Hutch++)
eigen      ``B * (K + k)`` at most: K Lanczos      the Krylov bases ``B * K * n`` + one
           steps, k residual products              chunk of pairs
=========  ======================================  ========================================

Results (``result_bytes``) are counted apart, as the service bounds them with its own
limit. ``fits`` is false when even one product, one sample's dense matrix (dense) or the
smallest useful Krylov basis (eigen) is over the budget, or the products are over
``max_products``; ``reason`` then says which. ``fitting_kinds`` names the operations
that would fit, for a 413 that says what to ask instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from hessian_service.engine.planner import FIRST_ORDER_FACTOR, SECOND_ORDER_FACTOR

KINDS: tuple[str, ...] = ("hvp", "jvp", "vjp", "rows", "diagonal", "trace", "eigen")
_FIRST_ORDER = frozenset({"jvp", "vjp"})

# Stochastic diagonal/trace without a product budget: 64 products per sample.
DEFAULT_STOCHASTIC_PRODUCTS = 64
# exact=None without max_products: exact by HVPs on basis vectors only up to this many
# products in all (a 784-input sample is 784); past it the stochastic estimate is used.
AUTO_EXACT_PRODUCTS = 4096
# Lanczos steps per sample without max_products (fewer when n is smaller: at n steps the
# Krylov space is the whole space and the pairs are exact).
DEFAULT_KRYLOV_STEPS = 300
# The dense strategy hands compute_hessian this share of the budget for its working
# memory and keeps the rest for the chunk of dense matrices it takes the diagonal of.
DENSE_WORKING_SHARE = 2


@dataclass(frozen=True)
class OperatorPlan:
    """What one operator request will cost, decided before it runs."""

    kind: str
    bytes: int  # peak working memory (results excluded)
    products: int  # products in all (eigen: at most)
    fits: bool
    method: str = ""  # diagonal/trace: the strategy picked; eigen: "lanczos"
    result_bytes: int = 0
    sample_chunk: int = 1  # samples per chunk
    vector_chunk: int = 1  # vectors (or dense samples) per chunk
    krylov_steps: int = 0  # eigen: Lanczos steps per sample at most
    reason: str = ""  # why it does not fit ("" when it does)


def bytes_per_product(kind: str, *, n: int, activation_numel: int, itemsize: int) -> int:
    """Working bytes of one product of one sample (``engine.planner``'s factors)."""
    factor = FIRST_ORDER_FACTOR if kind in _FIRST_ORDER else SECOND_ORDER_FACTOR
    return (activation_numel + n) * itemsize * factor


def product_chunks(batch: int, vectors: int, per_product: int, budget: int) -> tuple[int, int]:
    """(samples, vectors) per chunk: every vector of as many samples as fit, else as many
    vectors of one sample as fit (at least one pair: a budget below one product is the
    caller's ``fits`` check, not a reason to loop forever)."""
    pairs = max(1, budget // max(per_product, 1))
    if vectors <= pairs:
        return max(1, min(batch, pairs // max(vectors, 1))), max(vectors, 1)
    return 1, pairs


def dense_sample_chunk(n: int, batch: int, itemsize: int, budget: int) -> int:
    """Samples whose dense Hessians the dense strategy holds at once (0: not one)."""
    per_sample = n * n * itemsize
    return min(batch, (budget // DENSE_WORKING_SHARE) // per_sample)


def _work_ok(batch: int, n: int, activation_numel: int, max_work: int | None) -> bool:
    return max_work is None or batch * n * activation_numel <= max_work


def exact_method(
    *,
    n: int,
    batch: int,
    activation_numel: int,
    itemsize: int,
    memory_budget_bytes: int,
    exact: bool | None,
    max_products: int | None,
    max_work: int | None,
) -> tuple[str | None, str]:
    """The exact strategy a diagonal/trace takes (``dense``, ``hvp-basis``) or None, and
    why the others do not fit. The rules the strategies themselves apply (one source)."""
    if exact is False:
        return None, "exact=false asks for an estimate"
    work = batch * n * activation_numel
    if not _work_ok(batch, n, activation_numel, max_work):
        return None, (
            f"an exact answer is {work:.3g} activation elements of work "
            f"({batch} samples x {n} products x {activation_numel}), over max_work={max_work}"
        )
    products = batch * n
    if dense_sample_chunk(n, batch, itemsize, memory_budget_bytes) >= 1 and (
        max_products is None or products <= max_products
    ):
        return "dense", ""
    dense_bytes = n * n * itemsize * DENSE_WORKING_SHARE
    reasons = [f"one dense {n}x{n} Hessian needs {dense_bytes} bytes of the budget"]
    cap = max_products if max_products is not None else None
    if cap is None and exact is None:
        cap = AUTO_EXACT_PRODUCTS
    per_product = bytes_per_product(
        "hvp", n=n, activation_numel=activation_numel, itemsize=itemsize
    )
    if per_product > memory_budget_bytes:
        reasons.append(f"one product needs {per_product} bytes")
    elif cap is not None and products > cap:
        which = "max_products" if max_products is not None else "the automatic exact limit"
        reasons.append(f"{products} products ({batch} x {n}) are over {which} ({cap})")
    else:
        return "hvp-basis", ""
    return None, f"over memory_budget_bytes={memory_budget_bytes}: " + "; ".join(reasons)


def stochastic_products(batch: int, max_products: int | None) -> int:
    """Products per sample of a stochastic estimate: ``max_products`` shared over the
    batch, else ``DEFAULT_STOCHASTIC_PRODUCTS``."""
    if max_products is None:
        return DEFAULT_STOCHASTIC_PRODUCTS
    return max_products // batch


def krylov_steps(
    *,
    n: int,
    batch: int,
    k: int,
    itemsize: int,
    budget: int,
    per_product: int,
    max_products: int | None,
) -> int:
    """Lanczos steps per sample: n at most, ``max_products`` less the residual products,
    and what the bases (``B * K * n`` numbers, twice for the Ritz vectors) leave of the
    budget after one chunk of products."""
    steps = min(n, DEFAULT_KRYLOV_STEPS)
    if max_products is not None:
        steps = min(steps, max_products // batch - k)
    room = budget - min(budget // 2, per_product * batch)
    steps = min(steps, room // max(2 * batch * n * itemsize, 1))
    return max(steps, 0)


def plan_operator(
    kind: str,
    *,
    n: int,
    batch: int,
    activation_numel: int,
    itemsize: int,
    memory_budget_bytes: int,
    vectors: int = 1,
    outputs: int = 1,
    k: int = 5,
    exact: bool | None = None,
    max_products: int | None = None,
    max_work: int | None = None,
) -> OperatorPlan:
    """The plan of one request of ``kind`` (one of ``KINDS``), from sizes alone.

    ``vectors``: vectors per sample (hvp/jvp/vjp) or rows (rows); ``outputs``: the
    selected outputs per sample (the jvp result's and vjp vectors' size); ``k``: the
    eigenpairs; ``exact``/``max_products``/``max_work`` as the diagonal/trace/eigen
    functions take them.
    """
    if kind not in KINDS:
        raise ValueError(f"plan_operator: kind must be one of {KINDS}, got {kind!r}")
    per_product = bytes_per_product(kind, n=n, activation_numel=activation_numel, itemsize=itemsize)
    budget = memory_budget_bytes
    too_big = per_product > budget
    product_reason = (
        f"one product needs {per_product} bytes, over memory_budget_bytes={budget}"
        if too_big
        else ""
    )
    if kind in ("hvp", "jvp", "vjp", "rows"):
        samples, chunk = product_chunks(batch, vectors, per_product, budget)
        products = batch * vectors
        over = max_products is not None and products > max_products
        size = outputs if kind == "jvp" else n
        return OperatorPlan(
            kind=kind,
            bytes=per_product * samples * chunk,
            products=products,
            fits=not too_big and not over,
            method="forward-over-reverse" if kind in ("hvp", "rows") else "",
            result_bytes=batch * vectors * size * itemsize,
            sample_chunk=samples,
            vector_chunk=chunk,
            reason=product_reason
            or (f"{products} products over max_products={max_products}" if over else ""),
        )
    if kind in ("diagonal", "trace"):
        result_bytes = batch * (n if kind == "diagonal" else 1) * itemsize
        method, why = exact_method(
            n=n,
            batch=batch,
            activation_numel=activation_numel,
            itemsize=itemsize,
            memory_budget_bytes=budget,
            exact=exact,
            max_products=max_products,
            max_work=max_work,
        )
        if method == "dense":
            samples = dense_sample_chunk(n, batch, itemsize, budget)
            working = min(budget // DENSE_WORKING_SHARE, per_product * n * samples)
            return OperatorPlan(
                kind=kind,
                bytes=samples * n * n * itemsize + working,
                products=batch * n,
                fits=True,
                method="dense",
                result_bytes=result_bytes,
                sample_chunk=samples,
                vector_chunk=n,
            )
        if method == "hvp-basis":
            samples, chunk = product_chunks(batch, n, per_product, budget)
            return OperatorPlan(
                kind=kind,
                bytes=per_product * samples * chunk,
                products=batch * n,
                fits=True,
                method="hvp-basis",
                result_bytes=result_bytes,
                sample_chunk=samples,
                vector_chunk=chunk,
            )
        if exact:
            return OperatorPlan(
                kind=kind,
                bytes=0,
                products=batch * n,
                fits=False,
                method="",
                result_bytes=result_bytes,
                reason=f"exact=true, but {why}",
            )
        m = stochastic_products(batch, max_products)
        method = "hutchinson" if kind == "diagonal" or m < 3 else "hutch++"
        samples, chunk = product_chunks(batch, m, per_product, budget)
        sketch = 4 * batch * (m // 3) * n * itemsize if method == "hutch++" else 0
        small = m < 2
        return OperatorPlan(
            kind=kind,
            bytes=per_product * samples * chunk + sketch,
            products=batch * m,
            fits=not too_big and not small,
            method=method,
            result_bytes=2 * result_bytes,
            sample_chunk=samples,
            vector_chunk=chunk,
            reason=product_reason
            or (
                f"a stochastic estimate needs at least 2 products per sample, max_products="
                f"{max_products} gives {m} for {batch} samples"
                if small
                else ""
            ),
        )
    steps = krylov_steps(
        n=n,
        batch=batch,
        k=k,
        itemsize=itemsize,
        budget=budget,
        per_product=per_product,
        max_products=max_products,
    )
    needed = min(n, k + 1)
    fits = not too_big and steps >= needed
    return OperatorPlan(
        kind=kind,
        bytes=min(budget // 2, per_product * batch) + 2 * batch * steps * n * itemsize,
        products=batch * (steps + k),
        fits=fits,
        method="lanczos",
        result_bytes=batch * k * (n + 2) * itemsize,
        sample_chunk=batch,
        vector_chunk=1,
        krylov_steps=steps,
        reason=""
        if fits
        else product_reason
        or (
            f"{k} eigenpairs need at least {needed} Lanczos steps per sample; the budget "
            f"(memory_budget_bytes={budget}, max_products={max_products}) leaves {steps}"
        ),
    )


def fitting_kinds(
    *,
    n: int,
    batch: int,
    activation_numel: int,
    itemsize: int,
    memory_budget_bytes: int,
    max_products: int | None = None,
) -> tuple[str, ...]:
    """The operations (``KINDS``, one vector or row, default settings) that fit: what a
    413 for a dense Hessian suggests instead."""
    return tuple(
        kind
        for kind in KINDS
        if plan_operator(
            kind,
            n=n,
            batch=batch,
            activation_numel=activation_numel,
            itemsize=itemsize,
            memory_budget_bytes=memory_budget_bytes,
            max_products=max_products,
        ).fits
    )


def dense_bytes(n: int, batch: int, itemsize: int) -> int:
    """Bytes of ``B`` dense ``n x n`` Hessians: what ``/hessian`` would hold."""
    return batch * n * n * itemsize
