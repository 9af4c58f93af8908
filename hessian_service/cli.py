"""The ``hessian-service`` command: ``serve``, ``models``, ``jacobian``, ``hessian``, and the
operators ``hvp``, ``diagonal``, ``trace``, ``eigen``.

``serve`` starts the service (what ``make serve`` runs). The other commands talk to a
running server with the Python client: ``hessian --model quadratic4 --input x.npy
--output-index 2 --out h.npy`` writes the Hessian at ``x`` to ``h.npy``. An input shaped
like the model's input is one sample (the file holds one matrix); ``[N, *input_shape]``
is N samples, sent in batches with a progress bar on stderr, streamed to the file.
With ``--job`` the whole input is one job on the server (``POST /jobs``): computed there in
chunks, its progress shown from the server's counts, the result saved when it is done.
The operator commands send one request with the Python client (``Client.hvp``,
``hessian_diagonal``, ``hessian_trace``, ``hessian_eigen``): ``trace --model digits_cnn
--input x.npy --output-index 3`` prints ``{"products": ..., "exact": true, "trace": ...}``;
``--out`` saves the arrays (``.npz`` all of them: values, standard errors, eigenvectors).

What each needs: ``serve`` needs the server's packages (torch, FastAPI, uvicorn: the
``hessian-service`` distribution) and says so when one is missing; the client commands
import only ``hessian_client`` (httpx and numpy), never torch or the server. The command
is ``<venv>/bin/hessian-service``: its script runs that venv's Python, so it works by
absolute path without activating the venv, and ``serve`` execs uvicorn with that same
interpreter (``sys.executable``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hessian_client._wire import HessianServiceError

from hessian_service.compute_env import with_compute_defaults
from hessian_service.local_server import ALLOCATOR_ENV, uvicorn_command

DEFAULT_URL = os.environ.get("HESSIAN_URL", "http://127.0.0.1:8000")
# Each uvicorn worker would hold its own registry, uploads, jobs and metrics: after a
# POST /models answered 201, 9 of 12 GET /models/my_net answered 404 and the metrics total
# read differently on every scrape. Until workers share that state, more than one is
# refused, pointing to replicas behind a load balancer.
WORKERS_REFUSED = (
    "hessian-service serve: --workers {workers} is not supported: each worker process would "
    "keep its own models, uploads, jobs and metrics, so answers would differ from request "
    "to request. Run one server per process or machine behind a load balancer instead: "
    "deploy/nginx.conf in front of N replicas (README, 'Replicas behind nginx'), or "
    "Kubernetes replicas (deploy/k8s)."
)
# What `serve` runs on; the client commands need none of them.
SERVER_PACKAGES = ("uvicorn", "fastapi", "torch")


def _serve(args: argparse.Namespace) -> int:
    """Exec uvicorn on ``hessian_service.main:app`` with the allocator settings and the OpenMP
    defaults in its environment (glibc reads the first at process start and libgomp the
    second when torch loads, so neither can be set from inside afterwards).

    Checks first (without importing them) that the server's packages are installed in
    this interpreter, so a missing one is one clear line, not a child's traceback.
    """
    if args.workers != 1:
        print(WORKERS_REFUSED.format(workers=args.workers), file=sys.stderr)
        return 2
    missing = [name for name in SERVER_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"hessian-service serve: {', '.join(missing)} not installed in {sys.executable}'s "
            "environment; the server needs the hessian-service distribution with its "
            "dependencies (`pip install torch==2.13.0 .` in a checkout), not only hessian-client",
            file=sys.stderr,
        )
        return 1
    # The OpenMP defaults (compute_env.py): libgomp reads them when torch loads; yours win.
    env = with_compute_defaults({**ALLOCATOR_ENV, **os.environ})
    options = []
    if args.no_access_log:
        options.append("--no-access-log")
    os.execve(sys.executable, uvicorn_command(args.host, args.port, options), env)
    return 0  # pragma: no cover - execve does not return


def _models(args: argparse.Namespace) -> int:
    from hessian_client.client import Client

    with Client(args.url, retries=args.retries) as client:
        models = client.models()
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    print(f"{'name':<16} {'version':<8} {'input':<14} {'outputs':<8} ready")
    for model in models:
        shape = "x".join(map(str, model.get("input_shape") or [])) or "-"
        outputs = "x".join(map(str, model.get("output_shape") or [])) or "-"
        print(
            f"{model['name']:<16} {model['version']:<8} {shape:<14} {outputs:<8} {model['ready']}"
        )
    return 0


def _read_whole(path: Path) -> Any:
    """One sample's file, whole (it is small: one input)."""
    import numpy as np

    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        (array,) = load_file(str(path)).values()
        return array
    return np.load(path, allow_pickle=False)


def _derivative(args: argparse.Namespace) -> int:
    from hessian_client.client import Client
    from hessian_client.files import Inputs, save

    objective = json.loads(args.objective) if args.objective else None
    index = args.output_index
    output_index = index[0] if index and len(index) == 1 else index
    options = {
        "output_index": output_index,
        "objective": objective,
        "layout": args.layout,
        "precision": args.precision,
    }
    with Client(args.url, retries=args.retries) as client:
        if args.job:
            return _derivative_job(client, args, options)
        sample_shape = list(client.model(args.model)["input_shape"])
        inputs = Inputs(args.input)
        if list(inputs.shape) == sample_shape:  # one sample: one request, one matrix
            result = client.compute(args.command, args.model, _read_whole(args.input), **options)
            path = save(args.out, result.value, args.command)
        else:
            bulk = client.bulk_hessian if args.command == "hessian" else client.bulk_jacobian
            path = bulk(
                args.model,
                args.input,
                out=args.out,
                batch_size=args.batch_size,
                concurrency=args.concurrency,
                progress=not args.no_progress,
                resume=args.resume,
                **options,
            )
    print(path, file=sys.stderr)
    return 0


def _derivative_job(client: Any, args: argparse.Namespace, options: dict[str, Any]) -> int:
    """``--job``: the whole input as one job; its progress on stderr, then the result
    saved. Ctrl-C or ``--job-timeout`` cancels the job on the server before exiting."""
    from hessian_client.files import save

    job = client.submit(args.command, model=args.model, x=_read_whole(args.input), **options)
    print(f"job {job.id} submitted", file=sys.stderr)
    try:
        status = job.wait(progress=not args.no_progress, timeout=args.job_timeout)
    except (KeyboardInterrupt, TimeoutError) as stop:
        job.cancel()
        print(f"hessian-service {args.command}: job {job.id} cancelled ({stop!r})", file=sys.stderr)
        return 130 if isinstance(stop, KeyboardInterrupt) else 1
    if status["state"] != "succeeded":
        problem = status.get("problem") or {}
        detail = f": {problem.get('detail')}" if problem else ""
        print(
            f"hessian-service {args.command}: job {job.id} {status['state']}{detail}",
            file=sys.stderr,
        )
        return 1
    path = save(args.out, job.result().value, args.command)
    print(path, file=sys.stderr)
    return 0


def _derivative_parser(commands: Any, kind: str, summary: str) -> None:
    parser = commands.add_parser(
        kind,
        help=summary,
        description=f"{summary}. The input file is one sample shaped like the model's "
        "input (the output file then holds one matrix), or N samples [N, *input_shape] "
        "(sent in batches, streamed to the output file, with a progress bar on stderr).",
    )
    parser.add_argument("--model", required=True, help="a model's name (see `models`)")
    parser.add_argument(
        "--input", required=True, type=Path, help="input .npy (or .safetensors, one tensor)"
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        help="output file: .npy, or .safetensors (one tensor named after the command); "
        "written as <out>.partial and renamed when complete",
    )
    parser.add_argument(
        "--output-index",
        type=int,
        nargs="+",
        metavar="I",
        help="index (or indices) into the flattened per-sample output"
        + (
            "; required unless the model has one output or --objective is given"
            if kind == "hessian"
            else "; default: all outputs"
        ),
    )
    parser.add_argument(
        "--objective",
        metavar="JSON",
        help='a scalar built on the output instead of --output-index, e.g. \'{"type": '
        '"cross_entropy", "target": 3}\' (sum, log_softmax, mse, cross_entropy, weighted_sum)',
    )
    parser.add_argument(
        "--layout",
        choices=["matrix", "tensor"],
        default="matrix",
        help="matrix: n x n with n = prod(input_shape) (default); tensor: input_shape + "
        "input_shape",
    )
    parser.add_argument(
        "--precision",
        choices=["float32", "float64"],
        default="float32",
        help="compute dtype, and the output file's (default float32)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=16, help="samples per request (default 16)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=2, help="requests in flight at once (default 2)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from <out>.partial (same input and options)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--job",
        action="store_true",
        help="send the whole input as one job (POST /jobs): the server computes it in "
        "chunks, this command shows its progress, then saves the result; Ctrl-C cancels it",
    )
    parser.add_argument(
        "--job-timeout",
        type=float,
        default=None,
        metavar="S",
        help="with --job: give up waiting after S seconds (the job is cancelled)",
    )
    _client_options(parser)


# The operator commands: what each computes (its --help line).
OPERATORS = {
    "hvp": "Hessian-vector products H v of one scalar at the input (POST /hvp)",
    "diagonal": "the diagonal of one scalar's input Hessian, exact or estimated "
    "(POST /hessian/diagonal)",
    "trace": "the trace (Laplacian) of one scalar's input Hessian, exact or estimated "
    "(POST /hessian/trace)",
    "eigen": "k eigenpairs of one scalar's input Hessian by Lanczos (POST /hessian/eigen)",
}


def _operator_arrays(client: Any, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """Call the command's operator; its result and the arrays to save, by name."""
    common: dict[str, Any] = {
        "output_index": _output_index(args.output_index),
        "objective": json.loads(args.objective) if args.objective else None,
        "precision": args.precision,
    }
    x = _read_whole(args.input)
    if args.command == "hvp":
        result = client.hvp(args.model, x, _read_whole(args.vectors), **common)
        return result, {"hvp": result.values}
    if args.command == "eigen":
        result = client.hessian_eigen(
            args.model,
            x,
            k=args.k,
            which=args.which,
            tol=args.tol,
            max_products=args.max_products,
            seed=args.seed,
            **common,
        )
        names = ("eigenvalues", "eigenvectors", "residuals")
        return result, {name: getattr(result, name) for name in names}
    call = client.hessian_diagonal if args.command == "diagonal" else client.hessian_trace
    result = call(
        args.model, x, exact=args.exact, max_products=args.max_products, seed=args.seed, **common
    )
    arrays = {args.command: result.values}
    if result.standard_error is not None:
        arrays["standard_error"] = result.standard_error
    return result, arrays


def _operator(args: argparse.Namespace) -> int:
    """One operator request; a JSON summary on stdout (the cost, whether exact, and the
    numbers small enough to print: traces, eigenvalues, residuals), the arrays in --out."""
    import numpy as np
    from hessian_client.client import Client
    from hessian_client.files import save

    with Client(args.url, retries=args.retries) as client:
        result, arrays = _operator_arrays(client, args)
    summary: dict[str, Any] = {
        "products": result.products,
        "exact": result.exact,
        "method": result.method,
    }
    if args.command == "eigen":
        summary["converged"] = result.converged
    for name, array in arrays.items():
        small = args.command in ("trace", "eigen") and name != "eigenvectors"
        summary[name] = array.tolist() if small else {"shape": list(array.shape)}
    if args.out is not None:
        if args.out.suffix == ".npz":
            np.savez(args.out, **arrays)
            path = args.out
        else:
            path = save(args.out, next(iter(arrays.values())), args.command)
        summary["out"] = str(path)
    print(json.dumps(summary))
    return 0


def _output_index(index: list[int] | None) -> int | list[int] | None:
    return index[0] if index and len(index) == 1 else index


def _operator_parser(commands: Any, kind: str, summary: str) -> None:
    parser = commands.add_parser(
        kind,
        help=summary,
        description=f"{summary[0].upper()}{summary[1:]}. The input file is one sample or a "
        "batch [B, *input_shape], sent whole in one request. Prints a JSON summary (products, "
        "exact, method, and the values when they are small); --out saves the arrays.",
    )
    parser.add_argument("--model", required=True, help="a model's name (see `models`)")
    parser.add_argument(
        "--input", required=True, type=Path, help="input .npy (or .safetensors, one tensor)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="output file: .npz holds every array (e.g. diagonal and standard_error, or "
        "eigenvalues, eigenvectors and residuals); .npy or .safetensors the first one",
    )
    parser.add_argument(
        "--output-index",
        type=int,
        nargs="+",
        metavar="I",
        help="index into the flattened per-sample output (the scalar); required unless the "
        "model has one output or --objective is given",
    )
    parser.add_argument(
        "--objective", metavar="JSON", help="a scalar built on the output, as for `hessian`"
    )
    parser.add_argument(
        "--precision", choices=["float32", "float64"], default="float32", help="compute dtype"
    )
    if kind == "hvp":
        parser.add_argument(
            "--vectors",
            required=True,
            type=Path,
            help="the vectors v (.npy or .safetensors): [m, *input_shape] or [B, m, *input_shape]",
        )
        _client_options(parser)
        return
    parser.add_argument(
        "--max-products", type=int, help="most Hessian-vector products in all (default: server's)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random vectors")
    if kind == "eigen":
        parser.add_argument("--k", type=int, default=5, help="eigenpairs wanted (default 5)")
        parser.add_argument(
            "--which", choices=["largest", "smallest", "magnitude"], default="largest"
        )
        parser.add_argument(
            "--tol", type=float, default=1e-6, help="relative residual tolerance (default 1e-6)"
        )
    else:
        exact = parser.add_mutually_exclusive_group()
        exact.add_argument(
            "--exact", action="store_true", default=None, help="exact or refused (413)"
        )
        exact.add_argument(
            "--estimate",
            dest="exact",
            action="store_false",
            help="a stochastic estimate with its standard error, in --max-products products",
        )
    _client_options(parser)


def _client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", default=DEFAULT_URL, help=f"the server (default $HESSIAN_URL or {DEFAULT_URL})"
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=4,
        help="tries again after 429/503 or a lost connection, with backoff (default 4)",
    )


def parser() -> argparse.ArgumentParser:
    """The command line's parser (every option explained in --help)."""
    root = argparse.ArgumentParser(
        prog="hessian-service",
        description="Exact Jacobians and Hessians of neural networks w.r.t. their inputs: "
        "run the server, or call one.",
    )
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the server (what `make serve` runs)",
        description="Run the service with uvicorn (hessian_service.main:app). Settings come from "
        "HESSIAN_* environment variables (see the README); glibc's allocator is told to "
        "keep freed pages unless MALLOC_* variables are already set, and torch's OpenMP "
        "threads to sleep when idle (OMP_WAIT_POLICY=PASSIVE) unless it is already set.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="1 only: several workers would not share models, uploads or metrics; run "
        "replicas behind deploy/nginx.conf instead",
    )
    serve.add_argument("--no-access-log", action="store_true", help="no per-request log")
    models = commands.add_parser(
        "models",
        help="list the server's models",
        description="List the server's models: name, version, input and output shapes.",
    )
    models.add_argument("--json", action="store_true", help="print the full JSON instead")
    _client_options(models)
    _derivative_parser(commands, "jacobian", "Jacobians of a model's outputs at the inputs")
    _derivative_parser(commands, "hessian", "Hessians of a model's output at the inputs")
    for kind, summary in OPERATORS.items():
        _operator_parser(commands, kind, summary)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hessian-service``; exit status 1 with the server's message on
    errors."""
    args = parser().parse_args(argv)
    handlers = {"serve": _serve, "models": _models, "jacobian": _derivative, "hessian": _derivative}
    handlers.update(dict.fromkeys(OPERATORS, _operator))
    try:
        return handlers[args.command](args)
    except HessianServiceError as exc:
        print(f"hessian-service {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
