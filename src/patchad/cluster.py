"""Running patchad's work on a Ray cluster: ``--ray [ADDRESS]`` of ``benchmark``, ``fit`` and
``predict``.

Ray is an optional extra (``pip install "patchad[ray]"``); only this module imports it, and only
inside its functions, so ``import patchad`` and the CLI parser never load it. Every function here
distributes work that a library function already defines (:func:`patchad.benchmark.run_cell`,
:func:`patchad.sharded.select_shard`, ...); the driver, this process, alone writes the outputs.

Paths are sent to the workers as they are: data and model files must be readable at the same
path on every node (a shared filesystem), and patchad must be installed on every node.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patchad.errors import PatchadError

if TYPE_CHECKING:
    from patchad.benchmark import Cell, CellResult, CellRunner
    from patchad.sharded import ShardRunner

#: Times Ray reruns a task whose worker process or node died (``max_retries``).
MAX_RETRIES = 3


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise PatchadError('--ray: Ray is not installed (pip install "patchad[ray]")') from None
    return ray


def connect(address: str | None) -> bool:
    """Join a Ray cluster, or start a local one; return whether this call started Ray (the
    caller then calls :func:`disconnect` when done).

    Args:
        address: None (or ``"local"``) starts a new local cluster on this machine's CPUs,
            ignoring any cluster already running; ``"auto"`` joins the cluster started on this
            machine with ``ray start``; ``HOST:PORT`` or ``ray://HOST:PORT`` joins that one.
            Already connected (``ray.init`` called by the caller): nothing is done.

    Raises:
        PatchadError: Ray is missing, or the cluster cannot be reached.
    """
    ray = _ray()
    if ray.is_initialized():
        return False
    try:
        ray.init(
            address="local" if address in (None, "local") else address,
            include_dashboard=False,
            configure_logging=False,
            log_to_driver=False,
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        message = " ".join(str(exc).split())
        raise PatchadError(f"--ray {address or ''}: cannot start or join Ray ({message})") from None
    return True


def disconnect(started: bool) -> None:
    """Shut Ray down if :func:`connect` started it."""
    if started:
        _ray().shutdown()


@contextlib.contextmanager
def session(address: str | None) -> Iterator[None]:
    """:func:`connect` for the duration of a ``with`` block, then :func:`disconnect`."""
    started = connect(address)
    try:
        yield
    finally:
        disconnect(started)


def _failure(exc: BaseException, retries: int) -> str:
    """One line naming why a task failed after its retries."""
    ray = _ray()
    if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None:
        exc = exc.cause
        return " ".join(f"{type(exc).__name__}: {exc}".split())
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__} after {retries} retries: {first}"


def ray_runner(
    *, cpus_per_task: float = 1.0, max_retries: int = MAX_RETRIES
) -> Callable[..., CellRunner]:
    """A :data:`patchad.benchmark.CellRunner` factory that runs every benchmark cell as one Ray
    task of :func:`patchad.benchmark.run_cell` reserving ``cpus_per_task`` CPUs.

    A task whose worker or node dies is rerun up to ``max_retries`` times (Ray's
    ``max_retries``); a task that raises (bad data: the same input fails again) or is still lost
    after its retries becomes a failed row, and the other cells go on. Results arrive in the
    order the cells finish; the driver writes each as it comes.
    """

    def make(
        settings: dict[str, dict[str, Any]],
        *,
        shift_test: int | None,
        save_maps: Any,
        sha: str,
        progress: bool,
        say: Callable[[str], None],
    ) -> CellRunner:
        ray = _ray()
        from patchad.benchmark import run_cell

        if save_maps is not None:
            raise PatchadError("--save-maps: not supported with --ray (workers write no files)")
        task = ray.remote(run_cell).options(
            num_cpus=cpus_per_task, max_retries=max_retries, retry_exceptions=False
        )

        def run(cells: list[Cell]) -> Iterator[tuple[Cell, CellResult | str]]:
            refs = {
                task.remote(
                    test_set,
                    method,
                    settings.get(method, {}),
                    shift_test=shift_test,
                    sha=sha,
                    progress=False,
                ): (test_set, method)
                for test_set, method in cells
            }
            if refs:
                cpus = ray.cluster_resources().get("CPU", 0)
                say(
                    f"submitted {len(refs)} cells to Ray ({cpus:g} CPUs, {cpus_per_task:g} per "
                    "cell)"
                )
            return _collect(ray, refs, max_retries)

        return run

    return make


def _collect(
    ray: Any, refs: dict[Any, Cell], retries: int
) -> Iterator[tuple[Cell, CellResult | str]]:
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        for ref in ready:
            try:
                result: CellResult | str = ray.get(ref)
            except ray.exceptions.RayError as exc:
                result = _failure(exc, retries)
            yield refs[ref], result


def workers(cpus_per_task: float) -> float:
    """Tasks of ``cpus_per_task`` CPUs the connected cluster runs at once."""
    return float(_ray().cluster_resources().get("CPU", 0) // cpus_per_task)


def ray_shard_runner(*, cpus_per_task: float = 1.0, max_retries: int = MAX_RETRIES) -> ShardRunner:
    """A :data:`patchad.sharded.ShardRunner` running each shard of a sharded PatchCore fit as
    one Ray task of :func:`patchad.sharded.select_shard` (a lost task is rerun up to
    ``max_retries`` times); the selected rows come back to the driver in shard order.

    Raises:
        PatchadError: a shard failed (bad data, or lost after its retries).
    """
    ray = _ray()
    from patchad.sharded import select_shard

    task = ray.remote(select_shard).options(
        num_cpus=cpus_per_task, max_retries=max_retries, retry_exceptions=False
    )

    def run(jobs: list[tuple[dict[str, Any], list[Path], int]]) -> list[Any]:
        refs = [task.remote(*job) for job in jobs]
        try:
            return ray.get(refs)
        except ray.exceptions.RayError as exc:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise PatchadError(f"fit --ray: a shard failed: {_failure(exc, max_retries)}") from None

    return run
