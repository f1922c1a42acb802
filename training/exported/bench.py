"""`tlserve bench`: a running service over HTTP, or an export's runtimes in-process.

The HTTP load test and the onnxruntime timings live in serving/timing.py; the TensorFlow runtimes
join them through training/exported/loader.py, so this module only picks the branch and parses the lists.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from serving import timing as benchmarks
from serving.base.errors import UserError
from serving.base.manifest import resolve_model
from training.exported.options import BenchOptions


def ints(spec: str, option: str) -> tuple[int, ...]:
    """'1,8,32' as numbers; anything else is one error line naming the option."""
    try:
        return tuple(int(v) for v in spec.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{option} takes comma-separated whole numbers, not '{spec}'") from None


def bench(model_ref: str | None, opts: BenchOptions, *, models_dir: Path | None = None,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """The stored report (with its `path`): over HTTP when `opts.url` is set (the model, if given, adds the
    in-process floor and says where to store it), else every requested runtime of the model in-process."""
    model_dir = resolve_model(model_ref, models_dir) if model_ref else None
    if opts.url:
        target = benchmarks.check_url(opts.url, opts.allow_remote)
        uploads = benchmarks.sample_uploads((0, 0), folder=opts.images) if opts.images is not None else None
        return benchmarks.bench_http(target, concurrency=ints(opts.concurrency, "--concurrency"), requests=opts.requests,
                                     uploads=uploads, model_dir=model_dir, log=log)
    if model_dir is None:
        raise UserError("give a MODEL to benchmark in-process, or --url for a running service")
    from training.exported.loader import bench_model  # noqa: PLC0415  (the TensorFlow runtimes beside onnxruntime)

    return bench_model(model_dir, runtimes=tuple(r.strip() for r in opts.runtimes.split(",") if r.strip()),
                       batch_sizes=ints(opts.batch_sizes, "--batch-sizes"), iterations=opts.iterations,
                       duration=None if opts.iterations else opts.duration, warmup=opts.warmup, threads=opts.threads,
                       log=log)
