"""The served models: a folder of model files (``--models DIR``) or one file (``--model``),
each under its file stem, loaded lazily, unloaded least recently used past ``max_loaded``, and
swapped without downtime when its file changes.

A :class:`Version` is one loaded model file: its model, its batcher (the one thread that calls
it) and the SHA-256 of the bytes it was loaded from. A request holds the version it started
with (:meth:`Repository.acquire` / :meth:`Repository.release`) and finishes on it; a version
replaced or unloaded stops its batcher only once its last request is done.

:meth:`Repository.check` does one scan (tests call it directly); the watcher thread calls it
every ``watch_interval`` seconds. A file is seen as changed when its inode, size or mtime
change (an atomic replace changes the inode). A changed file whose model is loaded is loaded
again at once and swapped in when it loads; a replacement that fails to load leaves the old
version serving and the error in :meth:`Repository.describe`. Torch-free.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patchad.errors import PatchadError
from patchad.models import MODEL_SUFFIXES, load_model
from patchad.serve.batching import Batcher
from patchad.serve.drift import DriftSettings, DriftWindow, window_for
from patchad.serve.model import file_sha256, model_facts

log = logging.getLogger("patchad.serve")

#: How many swaps ``GET /models/{name}`` lists (the latest).
HISTORY = 20


class UnknownModel(PatchadError):
    """No model of that name; the message lists the known ones."""


class Unavailable(PatchadError):
    """The model exists but cannot answer now (loading, or its file failed to load)."""


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass
class Version:
    """One loaded model file."""

    name: str
    model: Any
    batcher: Batcher
    sha256: str | None
    facts: dict[str, Any]
    size: int
    drift: DriftWindow
    loaded_at: float = field(default_factory=time.time)
    users: int = 0
    retired: bool = False


@dataclass
class Entry:
    """A model name: its file, the version serving (None: not loaded) and its history."""

    name: str
    path: Path | None
    version: Version | None = None
    signature: tuple[int, int, int] | None = None
    sha256: str | None = None
    error: str | None = None
    failed: tuple[int, int, int] | None = None
    loading: bool = False
    last_used: float = 0.0
    swaps: list[dict[str, Any]] = field(default_factory=list)
    load_lock: threading.Lock = field(default_factory=threading.Lock)


class Repository:
    """The models served, by name.

    Args:
        make_batcher: builds a version's batcher from its model and facts.
        directory: serve every ``.safetensors``/``.onnx`` file in it (lazily).
        file: serve this one file (``--model``); exclusive with ``directory``.
        name: the name of a model given without a file (default ``"model"``).
        load_file: loads a model file (default :func:`patchad.models.load_model`).
        max_loaded: most versions loaded at once (None: no bound); the least recently used
            one is unloaded past it.
        max_loaded_mb: most MiB of model files loaded at once (None: no bound).
        drift: the drift window settings of every model.
    """

    def __init__(
        self,
        make_batcher: Callable[[Any, dict[str, Any]], Batcher],
        *,
        directory: str | os.PathLike[str] | None = None,
        file: str | os.PathLike[str] | None = None,
        name: str = "model",
        load_file: Callable[[Path], Any] = load_model,
        max_loaded: int | None = None,
        max_loaded_mb: float | None = None,
        drift: DriftSettings | None = None,
    ) -> None:
        if directory is not None and file is not None:
            raise ValueError("give a directory or a file, not both")
        self.directory = None if directory is None else Path(directory)
        self.file = None if file is None else Path(file)
        self.make_batcher = make_batcher
        self.load_file = load_file
        self.max_loaded = max_loaded
        self.max_loaded_mb = max_loaded_mb
        self.drift = drift or DriftSettings()
        self.on_swap: Callable[[str], None] | None = None
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {}
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        if self.file is not None:
            self._entries[self.file.stem] = Entry(self.file.stem, self.file)
        elif self.directory is None:
            self._entries[name] = Entry(name, None)
        if self.directory is not None and not self.directory.is_dir():
            raise PatchadError(f"{self.directory}: no such model folder")
        self.check()

    # ------------------------------------------------------------------------- names
    @property
    def single(self) -> str | None:
        """The one model's name when serving one file (or one model object), else None."""
        return None if self.directory is not None else next(iter(self._entries))

    def names(self) -> list[str]:
        """The known names, sorted."""
        with self._lock:
            return sorted(self._entries)

    def entry(self, name: str) -> Entry:
        """The entry of ``name``.

        Raises:
            UnknownModel: no such name; the message lists the known ones.
        """
        with self._lock:
            found = self._entries.get(name)
            known = sorted(self._entries)
        if found is None:
            raise UnknownModel(f"no model named {name!r}; known: {', '.join(known) or 'none'}")
        return found

    # ------------------------------------------------------------------ load, acquire
    def _load_version(self, entry: Entry, loader: Callable[[], Any] | None = None) -> Version:
        """Load the entry's file (or call ``loader``), consistent with the SHA-256 reported:
        loaded again if the file changed while it was read."""
        for _ in range(5):
            before = None if entry.path is None else _signature(entry.path)
            if entry.path is not None and before is None:
                raise PatchadError(f"{entry.path}: no such file")
            sha = None if entry.path is None else file_sha256(entry.path)
            model = loader() if loader is not None else self.load_file(entry.path)  # type: ignore[arg-type]
            if entry.path is None or loader is not None or _signature(entry.path) == before:
                break
        facts = model_facts(model, file=None if entry.path is None else str(entry.path))
        facts["sha256"] = sha
        batcher = self.make_batcher(model, facts)
        facts["served_batch_size"] = batcher.batch_size
        size = 0 if before is None else before[1]
        entry.signature = before
        entry.sha256 = sha
        return Version(entry.name, model, batcher, sha, facts, size, window_for(self.drift, facts))

    def preload(self, name: str, model: Any) -> None:
        """Serve ``model`` (a loaded model, or a function returning one) as ``name``'s first
        version; raises what the function raises, and records it as the entry's error."""
        entry = self.entry(name)
        with entry.load_lock:
            entry.loading = True
            try:
                loader = model if not hasattr(model, "predict") else (lambda: model)
                version = self._load_version(entry, loader)
            except BaseException as exc:
                entry.error = _message(exc)
                raise
            finally:
                entry.loading = False
            self._swap(entry, version)

    def acquire(self, name: str, *, lazy: bool = True) -> Version:
        """The version serving ``name``, held until :meth:`release`; loaded first when
        ``lazy`` and not loaded (blocks: call it from a thread).

        Raises:
            UnknownModel: no such name.
            Unavailable: loading, or its file failed to load.
        """
        entry = self.entry(name)
        while True:
            with self._lock:
                version = entry.version
                if version is not None:
                    version.users += 1
                    entry.last_used = time.monotonic()
                    return version
            if not lazy or entry.failed is not None:
                raise Unavailable(f"model {name!r}: " + (entry.error or "loading"))
            with entry.load_lock:  # waits for a load in progress
                if entry.version is None and entry.failed is None:
                    self._try_load(entry)

    def _try_load(self, entry: Entry) -> None:
        entry.loading = True
        try:
            version = self._load_version(entry)
        except Exception as exc:
            entry.error = f"failed to load: {_message(exc)}"
            entry.failed = entry.signature if entry.path is None else _signature(entry.path)
            log.error("model %s: %s", entry.name, entry.error)
            return
        finally:
            entry.loading = False
        self._swap(entry, version)
        self._evict(keep=entry.name)

    def release(self, version: Version) -> None:
        """A request is done with ``version``; a retired version closes after its last one."""
        with self._lock:
            version.users -= 1
            close = version.retired and version.users == 0
        if close:
            _close(version)

    def _retire(self, version: Version) -> None:
        with self._lock:
            version.retired = True
            close = version.users == 0
        if close:
            _close(version)

    def _swap(self, entry: Entry, version: Version) -> None:
        with self._lock:
            old = entry.version
            entry.version = version
            entry.error = None
            entry.failed = None
            entry.last_used = time.monotonic()
            if old is not None and old.sha256 != version.sha256:
                swap = {"time": _now(), "old_sha256": old.sha256, "new_sha256": version.sha256}
                entry.swaps = [*entry.swaps, swap][-HISTORY:]
        if old is not None:
            log.warning(
                "model %s: swapped, sha256 %s -> %s", entry.name, old.sha256, version.sha256
            )
            self._retire(old)
            if self.on_swap is not None:
                self.on_swap(entry.name)

    def _evict(self, keep: str) -> None:
        """Unload least recently used versions past the bounds, never ``keep``."""
        while True:
            with self._lock:
                loaded = [e for e in self._entries.values() if e.version is not None]
                count = len(loaded)
                mib = sum(e.version.size for e in loaded if e.version) / 2**20
                over = (self.max_loaded is not None and count > self.max_loaded) or (
                    self.max_loaded_mb is not None and mib > self.max_loaded_mb
                )
                victims = sorted((e for e in loaded if e.name != keep), key=lambda e: e.last_used)
                if not over or not victims:
                    return
                victim = victims[0]
                version, victim.version = victim.version, None
            log.info("model %s: unloaded (least recently used)", victim.name)
            assert version is not None
            self._retire(version)

    def reload(self, name: str) -> dict[str, Any]:
        """Load ``name``'s file again now and swap it in; on failure the old version keeps
        serving. Returns :meth:`describe`.

        Raises:
            UnknownModel: no such name.
            PatchadError: the file failed to load (the old version, if any, still serves).
        """
        entry = self.entry(name)
        if entry.path is None:
            raise PatchadError(f"model {name!r} has no file to reload")
        with entry.load_lock:
            self._reload(entry)
        if entry.error is not None:
            raise PatchadError(f"model {name!r}: {entry.error}")
        return self.describe(name)

    def _reload(self, entry: Entry) -> None:
        entry.loading = entry.version is None
        try:
            version = self._load_version(entry)
        except Exception as exc:
            old = entry.version
            kept = "" if old is None else f"; still serving sha256 {old.sha256}"
            entry.error = f"reload failed: {_message(exc)}{kept}"
            entry.failed = None if entry.path is None else _signature(entry.path)
            log.error("model %s: %s", entry.name, entry.error)
            return
        finally:
            entry.loading = False
        self._swap(entry, version)
        self._evict(keep=entry.name)

    # ------------------------------------------------------------------------- watch
    def _files(self) -> dict[str, Path]:
        if self.directory is None:
            return {} if self.file is None else {self.file.stem: self.file}
        found = {}
        for path in sorted(self.directory.iterdir()):
            if path.name.startswith(".") or path.suffix.lower() not in MODEL_SUFFIXES:
                continue
            if path.is_file() and path.stem not in found:
                found[path.stem] = path
        return found

    def check(self) -> None:
        """One scan: add new files, drop removed ones, reload changed ones that are loaded."""
        if self.directory is None and self.file is None:
            return
        files = self._files()
        with self._lock:
            for name in [n for n in self._entries if n not in files and self.directory]:
                gone = self._entries.pop(name)
                log.warning("model %s: file removed, no longer served", name)
                if gone.version is not None:
                    gone.version.retired = True
                    if gone.version.users == 0:
                        threading.Thread(target=_close, args=(gone.version,)).start()
            for name, path in files.items():
                if name not in self._entries or self._entries[name].path != path:
                    self._entries[name] = Entry(name, path)
            entries = list(self._entries.values())
        for entry in entries:
            assert entry.path is not None
            signature = _signature(entry.path)
            if signature is None or signature == entry.signature or signature == entry.failed:
                continue
            if not entry.load_lock.acquire(blocking=False):
                continue  # being loaded now; the next scan looks again
            try:
                if entry.version is not None:
                    self._reload(entry)
                else:
                    entry.sha256 = file_sha256(entry.path)
                    entry.signature = signature
                    entry.failed = None
                    entry.error = None
            finally:
                entry.load_lock.release()

    def watch(self, interval: float) -> None:
        """Start the thread that calls :meth:`check` every ``interval`` seconds."""
        if interval <= 0 or self._watcher is not None:
            return

        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    self.check()
                except Exception as exc:  # a scan error is logged; the next scan tries again
                    log.error("model scan failed: %s", _message(exc))

        self._watcher = threading.Thread(target=run, name="patchad-watch", daemon=True)
        self._watcher.start()

    def close(self) -> None:
        """Stop the watcher and every batcher (each finishes the images it holds)."""
        self._stop.set()
        with self._lock:
            versions = [e.version for e in self._entries.values() if e.version is not None]
        for version in versions:
            version.batcher.close()

    # ---------------------------------------------------------------------- describe
    def describe(self, name: str) -> dict[str, Any]:
        """What ``GET /models/{name}`` answers: the file's SHA-256, whether loaded, the last
        error, the swaps, the drift window and, when loaded, the model's facts."""
        entry = self.entry(name)
        version = entry.version
        facts = dict(version.facts) if version is not None else {}
        lineage = None if version is None else _lineage(version.model)
        return {
            "name": name,
            "file": None if entry.path is None else entry.path.name,
            "sha256": version.sha256 if version is not None else entry.sha256,
            "file_sha256": entry.sha256,
            "loaded": version is not None,
            "loaded_at": None if version is None else _now(version.loaded_at),
            "error": entry.error,
            "swaps": list(entry.swaps),
            "lineage": lineage,
            "facts": facts or None,
            "drift": None if version is None else version.drift.snapshot(),
        }

    def versions(self) -> list[Version]:
        """The versions loaded now."""
        with self._lock:
            return [e.version for e in self._entries.values() if e.version is not None]


def _lineage(model: Any) -> Any:
    """What the model file records of its history, where it does (None otherwise)."""
    for attribute in ("lineage", "lineage_"):
        value = getattr(model, attribute, None)
        if value is not None and not callable(value):
            return value
    return None


def _close(version: Version) -> None:
    version.batcher.close()


def _message(exc: BaseException) -> str:
    if isinstance(exc, PatchadError):
        return str(exc)
    return f"internal error: {type(exc).__name__}"


def _now(at: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if at is None else at))
