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

import collections
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
        test_scales: tuple[int | str, ...] = (),
        intervals: bool = True,
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
                    test_scales=test_scales,
                    sha=sha,
                    progress=False,
                    seed=seed,
                    intervals=intervals,
                ): (test_set, method, seed)
                for test_set, method, seed in cells
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
    """A :data:`patchad.sharded.ShardRunner` running each shard of a sharded fit
    (:func:`patchad.sharded.select_shard`, :func:`patchad.sharded.padim_moments`) as one Ray
    task (a lost task is rerun up to ``max_retries`` times); the results come back to the
    driver in shard order.

    Raises:
        PatchadError: a shard failed (bad data, or lost after its retries).
    """
    ray = _ray()

    def run(function: Callable[..., Any], jobs: list[tuple[Any, ...]]) -> list[Any]:
        task = ray.remote(function).options(
            num_cpus=cpus_per_task, max_retries=max_retries, retry_exceptions=False
        )
        refs = [task.remote(*job) for job in jobs]
        try:
            return ray.get(refs)
        except ray.exceptions.RayError as exc:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise PatchadError(f"fit --ray: a shard failed: {_failure(exc, max_retries)}") from None

    return run


#: ``predict --ray`` records each batch written here (removed when the run completes), so that
#: ``--resume`` rescoring nothing that is done.
JOURNAL = "predict-progress.jsonl"

#: Batches Ray Data queues on one scoring actor at a time (its ``max_tasks_in_flight_per_actor``).
IN_FLIGHT_PER_ACTOR = 2

#: Ray object store memory that ``predict --ray``'s dataset may fill (its ``resource_limits``):
#: scored batches waiting for the driver stop the actors beyond it (at least one batch still
#: runs when a batch is larger). Measured with a trivial 2 MiB-per-batch function, 2 actors and
#: a driver taking 0.1 s per batch: 77 batches ahead of the driver without a limit, 3-5 with
#: 1-16 MiB.
OBJECT_STORE_BUDGET = 256 * 2**20


class Scorer:
    """Ray Data's callable class for ``predict --ray``: one detector per actor, loaded once,
    scoring rows of ``{"batch": k, "paths": [path, ...]}`` (one model batch per row).

    Each output row is ``{"batch": k, "result": npz bytes, "error": message}``: the npz holds
    ``positions`` (int64, the readable paths' positions in the row's list), ``scores`` (B,)
    float32, one ``map<i>`` (H_i, W_i) float32 per readable image and ``skipped`` (str, the
    warnings of the images skipped with ``skip_bad``, for the driver to repeat). A batch that
    cannot be scored (an unreadable image without ``skip_bad``) comes back with its error
    message and no result, so the driver stops on it in input order, after writing the batches
    before it.
    """

    def __init__(self, model: str, weights: str | None, skip_bad: bool) -> None:
        from patchad.detectors import load

        self.detector = load(model, weights=weights)
        self.skip_bad = skip_bad

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        """Ray Data's call: input columns ``batch`` (n,) and ``paths`` (n, list of str), one
        output row per input row (n is 1: ``map_batches(batch_size=1)``)."""
        from patchad.testhold import hold

        hold("ray-score")  # tests only: an actor holds a batch it took
        out: dict[str, list[Any]] = {"batch": [], "result": [], "error": []}
        for k, paths in zip(batch["batch"], batch["paths"], strict=True):
            out["batch"].append(int(k))
            try:
                out["result"].append(self.score([str(p) for p in paths]))
                out["error"].append("")
            except PatchadError as exc:
                out["result"].append(b"")
                out["error"].append(str(exc))
        return out

    def score(self, paths: list[str]) -> bytes:
        """The npz bytes described in the class docstring for one batch of ``paths``."""
        import io
        import warnings

        import numpy as np

        from patchad.batching import SkippedImageWarning

        names: list[str] = []
        scores: list[Any] = []
        maps: list[Any] = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SkippedImageWarning)
            try:
                for part in self.detector.iter_predict(paths, skip_bad=self.skip_bad):
                    names.extend(part.names)
                    scores.append(part.scores)
                    maps.extend(part.maps)
            except PatchadError:
                lost = [w for w in caught if issubclass(w.category, SkippedImageWarning)]
                if not (self.skip_bad and len(lost) == len(paths)):
                    raise  # else: every image of the batch skipped, which is not an error here
        skipped = [str(w.message) for w in caught if issubclass(w.category, SkippedImageWarning)]
        positions, pending = [], iter(range(len(paths)))
        for name in names:  # the batch's readable images, in order
            positions.append(next(i for i in pending if paths[i] == name))
        joined = np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)
        arrays = {f"map{i}": m for i, m in enumerate(maps)}
        buffer = io.BytesIO()
        np.savez(
            buffer,
            positions=np.array(positions, dtype=np.int64),
            scores=joined,
            skipped=np.array(skipped, dtype=str),
            **arrays,
        )
        return buffer.getvalue()


def _unpack(result: bytes) -> tuple[list[int], Any, list[Any], list[str]]:
    """Positions, scores, maps and skipped-image warnings from :meth:`Scorer.score`'s bytes."""
    import io

    import numpy as np

    with np.load(io.BytesIO(result)) as z:
        positions = [int(i) for i in z["positions"]]
        maps = [z[f"map{i}"] for i in range(len(positions))]
        return positions, z["scores"], maps, [str(m) for m in z["skipped"]]


def _data_failure(exc: BaseException) -> str:
    """One line naming why Ray Data stopped: the innermost cause of ``exc``."""
    seen = {id(exc)}
    while True:
        nxt = getattr(exc, "cause", None) or exc.__cause__
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(nxt))
        exc = nxt
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return " ".join(f"{type(exc).__name__}: {first}".split())


@contextlib.contextmanager
def _quiet_ray_data() -> Iterator[None]:
    """Ray Data's INFO/WARNING lines (execution started/finished, progress bars off) stay out
    of the CLI's stderr while the block runs, and so do its deprecation warnings."""
    import logging
    import warnings

    import ray.data  # noqa: F401  (configures its logger on first import: before the level)

    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # Ray Data's own deprecation notices (DataContext fields, ray_remote_args)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.")
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
            yield
    finally:
        logger.setLevel(level)


def _score_stream(
    paths: list[str],
    todo: list[int],
    batches: list[list[int]],
    *,
    model: str,
    weights: str | None,
    skip_bad: bool,
    actors: int,
    cpus_per_task: float,
    max_retries: int,
) -> Iterator[dict[str, Any]]:
    """Ray Data rows ``{"batch", "result", "error"}`` of the batches ``todo``, in that order.

    One row per batch in, one per batch out (``batch_size=1`` row, so a model batch is always
    the ``batch_size`` paths of the local run: Ray Data's own block splitting would not keep
    that grid). ``preserve_order`` streams the rows back in input order; at most
    ``actors x IN_FLIGHT_PER_ACTOR`` batches are queued on the actors, and the finished ones
    waiting for the driver fill at most about ``OBJECT_STORE_BUDGET`` of the object store.
    """
    import ray.data

    items = [{"batch": k, "paths": [paths[i] for i in batches[k]]} for k in todo]
    ds = ray.data.from_items(items)
    ds.context.execution_options.preserve_order = True
    limits = ds.context.execution_options.resource_limits
    ds.context.execution_options.resource_limits = limits.copy(
        object_store_memory=OBJECT_STORE_BUDGET
    )
    ds.context.enable_progress_bars = False
    ds.context.print_on_execution_start = False
    # max_restarts/max_task_retries go through map_batches' ray_remote_args, the only way Ray
    # Data 2.60 takes them (deprecated there, warning silenced by _quiet_ray_data; left out,
    # Ray Data restarts an actor and reruns its batch forever)
    scored = ds.map_batches(
        Scorer,
        fn_constructor_args=(model, weights, skip_bad),
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(
            size=actors, max_tasks_in_flight_per_actor=IN_FLIGHT_PER_ACTOR
        ),
        num_cpus=cpus_per_task,
        max_restarts=max_retries,
        max_task_retries=max_retries,
    )
    rows = iter(scored.iter_rows())
    try:
        yield from rows
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()  # stops the executor and its actors when the driver stops early


def _read_journal(path: Path, batches: list[list[int]]) -> dict[int, tuple[list[int], list[float]]]:
    """Finished batches of an earlier run: batch number -> (input indices, scores)."""
    import json

    done: dict[int, tuple[list[int], list[float]]] = {}
    if not path.exists():
        return done
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
            k, index, scores = int(entry["batch"]), entry["index"], entry["scores"]
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the interruption
        if k < len(batches) and set(index) <= set(batches[k]) and len(index) == len(scores):
            done[k] = ([int(i) for i in index], [float(s) for s in scores])
    return done


def predict(
    detector: Any,
    model: str | Path,
    paths: list[Path],
    out: Path,
    *,
    sources: list[str] | None = None,
    weights: str | None = None,
    skip_bad: bool = False,
    resume: bool = False,
    cpus_per_task: float = 1.0,
    max_retries: int = MAX_RETRIES,
    on_progress: Callable[[int], None] | None = None,
    outputs: Any = None,
) -> Any:
    """``patchad predict`` on Ray Data: the batches of ``detector.batch_size`` input paths
    still to do go through ``map_batches`` on a pool of :class:`Scorer` actors (one per
    ``cpus_per_task`` CPUs of the cluster, each loading the model once); this process streams
    the results back in input order and feeds them to
    :func:`patchad.outputs.write_predictions`, so the files are those of a local run.

    An actor whose process dies is restarted and its batch rerun (Ray's ``max_restarts`` and
    ``max_task_retries``, ``max_retries`` each). Each batch whose files are written is recorded
    in ``out/predict-progress.jsonl``; with ``resume``, batches recorded there are read back from
    ``maps/`` instead of being scored again. The record is removed when the run completes. A run
    whose ``outputs`` leave out the maps keeps no record (a resumed run scores every batch).

    Args:
        detector: the loaded model (its thresholds make the decisions, here).
        model: its file, loaded by every actor (a path every node can read).
        paths: input image files, in order.
        out: output folder (exists).
        sources: what the user named, for the output names.
        weights: backbone weights file for the actors.
        skip_bad: skip unreadable images instead of stopping.
        resume: keep the batches recorded by an interrupted run.
        cpus_per_task: CPUs each actor reserves; the cluster's CPUs / this = actors.
        max_retries: restarts of a dead actor, and reruns of its batch.
        on_progress: called with the number of images in each written batch.
        outputs: which files to write (:func:`patchad.outputs.parse_outputs`); None = all.

    Returns:
        :class:`patchad.outputs.WrittenOutputs`.

    Raises:
        PatchadError: an image could not be scored (the batches before it are written and
            recorded), or Ray Data failed (a batch still lost after its retries).
    """
    import json
    import warnings

    import numpy as np

    from patchad.batching import SkippedImageWarning
    from patchad.outputs import output_names, parse_outputs, write_predictions

    chosen = parse_outputs(outputs)
    ray = _ray()
    size = detector.batch_size
    batches = [list(range(i, min(i + size, len(paths)))) for i in range(0, len(paths), size)]
    journal = out / JOURNAL
    record = "maps" in chosen  # a resumed run reads the recorded batches' maps back
    done = _read_journal(journal, batches) if resume and record else {}
    if not resume or not record:
        journal.unlink(missing_ok=True)
    names = output_names(paths, sources)
    todo = [k for k in range(len(batches)) if k not in done]
    count = max(1, min(len(todo), int(workers(cpus_per_task))))
    stream = (
        _score_stream(
            [str(p) for p in paths],
            todo,
            batches,
            model=str(model),
            weights=weights,
            skip_bad=skip_bad,
            actors=count,
            cpus_per_task=cpus_per_task,
            max_retries=max_retries,
        )
        if todo
        else iter(())
    )

    entries: collections.deque[dict[str, Any]] = collections.deque()

    def parts() -> Any:
        scored = 0
        for k in range(len(batches)):
            if k in done:
                index, scores = done[k]
                maps = [np.load(out / "maps" / f"{names[i]}.npy") for i in index]
                values = np.array(scores, dtype=np.float32)
            else:
                try:
                    row = next(stream)
                except ray.exceptions.RayError as exc:
                    raise PatchadError(f"predict --ray: {_data_failure(exc)}") from None
                except StopIteration:
                    raise PatchadError(f"predict --ray: batch {k} never came back") from None
                if int(row["batch"]) != k:  # preserve_order broken: never write out of order
                    raise PatchadError(f"predict --ray: got batch {row['batch']}, not {k}")
                if row["error"]:
                    raise PatchadError(row["error"])
                positions, values, maps, skipped = _unpack(row["result"])
                for message in skipped:  # as a local run warns, from the driver
                    warnings.warn(message, SkippedImageWarning, stacklevel=1)
                index = [batches[k][p] for p in positions]
            scored += len(index)
            entries.append({"batch": k, "index": index, "scores": [float(s) for s in values]})
            yield detector._decide(values, maps, [str(paths[i]) for i in index])
        if paths and not scored:  # skip_bad, and every image skipped: as iter_predict says
            raise PatchadError(f"none of the {len(paths)} images could be read (first: {paths[0]})")

    with _quiet_ray_data(), open(journal, "a") if record else contextlib.nullcontext() as log:

        def written_batch(_: Any) -> None:  # its files are written: record it
            entry = entries.popleft()
            if log is not None:
                log.write(json.dumps(entry) + "\n")
                log.flush()

        try:
            written = write_predictions(
                parts(),
                paths,
                out,
                sources=sources,
                pixel_threshold=detector.pixel_threshold_ if detector.is_calibrated else None,
                on_progress=on_progress,
                outputs=chosen,
                on_written=written_batch,
            )
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
    journal.unlink(missing_ok=True)
    return written
