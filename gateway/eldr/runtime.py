"""The active zone table, hot-reloaded, and its mapping of zones onto registered decode workers.

State model: one immutable `ActiveZones` snapshot, replaced by a single reference assignment
(atomic for every reader on the event loop: a decision sees the old table or the new one, never a
mix). A reload parses and fully validates the file with `zones.table.load_table` (checksum
included) off the event loop; on any error the old snapshot keeps serving and the error is
recorded (`last_error`, `GET /zones`, `eldr_zone_reloads_total{result="failed"}`).

Reload triggers:
- `watch()`: polls the path's (device, inode, size, mtime_ns, resolved target) every few seconds.
  Polling, not inotify: Kubernetes updates a mounted ConfigMap by writing a new timestamped
  directory and atomically swapping the `..data` symlink, which inotify on the visible path
  misses but `stat()` (which follows symlinks) sees as a new inode. A fingerprint that failed to
  load is not retried until it changes, so a corrupt file logs one error, not one per poll.
- `install_sighup()`: `kill -HUP` reloads (Unix only); `watch()` installs it for as long as it
  runs.
- `POST /admin/zones/reload` (gateway/admin.py) awaits `reload()`; `GET /zones` shows `info()`.
This module does no HTTP: the admin module owns the routes.

Zone -> worker mapping: zone k is served by `table.workers[k]` (matched against registered
workers by id or URL, trailing slash ignored). When that worker is not registered (it left, or was
renamed) the zone is *orphaned*; orphaned zones are handed, in zone order, to registered workers
that serve no zone, in id order. When the original worker registers again it takes its zone back.
A zone with no worker at all stays unmapped and the band skips it. Until the registry reports its
workers (`set_workers` never called) the table's names are used as they are.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from gateway.eldr.band import normalize_worker_key
from gateway.eldr.metrics import EldrMetrics
from gateway.urls import redact_url
from zones.geometry import ModelGeometry, describe, same_shape
from zones.table import ZoneTable, ZoneTableError, load_table

log = logging.getLogger(__name__)

ReloadStatus = Literal["loaded", "unchanged", "failed"]
Fingerprint = tuple[int, int, int, int, str]
DEFAULT_WATCH_INTERVAL_SECS = 2.0


@dataclass(frozen=True)
class ActiveZones:
    """An immutable snapshot: a validated table plus its current zone -> worker mapping."""

    table: ZoneTable
    zone_workers: tuple[str | None, ...]  # worker id (or the table's name) per zone; None: none
    generation: int  # successful table loads in this process, starting at 1
    loaded_at: float  # unix seconds
    source: str  # the path it was read from

    @property
    def checksum(self) -> str:
        return self.table.checksum

    @property
    def version(self) -> str:
        """`provenance.version` when the fitter recorded one, else the checksum's first 12 hex."""
        version = self.table.provenance.get("version")
        if isinstance(version, (str, int)) and not isinstance(version, bool):
            return str(version)
        return self.table.checksum.removeprefix("sha256:")[:12]

    @property
    def unmapped(self) -> int:
        return sum(1 for w in self.zone_workers if w is None)


@dataclass(frozen=True)
class ReloadResult:
    status: ReloadStatus
    error: str | None
    active: ActiveZones | None


def map_zones(
    table_workers: Sequence[str], registered: Sequence[tuple[str, str]] | None
) -> tuple[str | None, ...]:
    """Zone -> worker id, given registered workers as (worker_id, url) pairs (module docstring).

    `registered=None` means "registry not known yet": the table's names are kept verbatim.
    """
    if registered is None:
        return tuple(table_workers)
    by_key: dict[str, str] = {}
    for worker_id, url in registered:
        by_key.setdefault(normalize_worker_key(worker_id), worker_id)
        by_key.setdefault(normalize_worker_key(url), worker_id)
    mapped: list[str | None] = [by_key.get(normalize_worker_key(w)) for w in table_workers]
    owned = {w for w in mapped if w is not None}
    free = iter(sorted({wid for wid, _ in registered} - owned))
    for zone, worker in enumerate(mapped):
        if worker is None:
            mapped[zone] = next(free, None)
    return tuple(mapped)


def fingerprint(path: str | os.PathLike[str]) -> Fingerprint | None:
    """What changes when the file does, including ConfigMap-style symlink swaps; None if absent."""
    try:
        st = os.stat(path)  # follows symlinks: a swapped `..data` link yields the new inode
        target = os.path.realpath(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, target)


class ZoneRuntime:
    """Holds the active zone table; reloads it on demand, on file change and on SIGHUP."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        *,
        metrics: EldrMetrics | None = None,
        loader: Callable[[str], ZoneTable] = load_table,
        clock: Callable[[], float] = time.time,
        geometry: ModelGeometry | None = None,
    ) -> None:
        self.path: str | None = None if path is None else os.fspath(path)
        # The served model's routing shape (--model-geometry): a table of another shape would
        # decode no signature and turn every decision into a fallback, so it is refused.
        self.expected_geometry = geometry
        self.active: ActiveZones | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_attempt_at: float | None = None
        self._metrics = metrics
        self._loader = loader
        self._clock = clock
        self._registered: tuple[tuple[str, str], ...] | None = None
        self._generation = 0
        self._lock = asyncio.Lock()
        self._seen: Fingerprint | None = None
        self._tasks: set[asyncio.Task[ReloadResult]] = set()
        self._publish()

    # --- loading -------------------------------------------------------------------------------
    async def reload(self) -> ReloadResult:
        """Load off the event loop (parsing a large table takes milliseconds), swap on it.
        Reloads are serialised so two triggers cannot install tables out of order."""
        async with self._lock:
            if self.path is None:
                return self._fail("zones: no zone table path configured (--zones)")
            path = self.path
            self._seen = fingerprint(path)
            loop = asyncio.get_running_loop()
            try:
                table = await loop.run_in_executor(None, self._loader, path)
            except ZoneTableError as exc:
                return self._fail(f"{path}: {exc}")
            except Exception as exc:
                return self._fail(f"{path}: unexpected error loading zone table: {exc!r}")
            expected = self.expected_geometry
            if expected is not None and not same_shape(table.geometry, expected):
                return self._fail(
                    f"{path}: zone table is for {describe(table.geometry)}, but the served model "
                    f"is {describe(expected)} (--model-geometry)")
            return self._install(table)

    def _install(self, table: ZoneTable) -> ReloadResult:
        now = self._clock()
        self.last_attempt_at = now
        self.last_error = None
        self.last_error_at = None
        old = self.active
        if old is not None and old.checksum == table.checksum:
            self._record("unchanged")
            return ReloadResult("unchanged", None, old)
        self._generation += 1
        workers = map_zones(table.workers, self._registered)
        self.active = ActiveZones(table, workers, self._generation, now, self.path or "")
        self._record("loaded")
        self._publish()
        log.info(
            "zone table loaded: %s zones, version %s, %s",
            table.num_zones, self.active.version, table.checksum,
        )
        return ReloadResult("loaded", None, self.active)

    def _fail(self, message: str) -> ReloadResult:
        now = self._clock()
        self.last_attempt_at = now
        self.last_error = message
        self.last_error_at = now
        self._record("failed")
        log.error("zone table rejected, keeping the active one: %s", message)
        return ReloadResult("failed", message, self.active)

    def _record(self, status: ReloadStatus) -> None:
        if self._metrics is not None:
            self._metrics.record_reload(status)

    def _publish(self) -> None:
        if self._metrics is None:
            return
        a = self.active
        if a is None:
            self._metrics.set_active_table(None, None, 0, 0, None)
        else:
            self._metrics.set_active_table(
                a.version, a.checksum, a.table.num_zones, a.unmapped, a.loaded_at
            )

    @property
    def geometry(self) -> ModelGeometry | None:
        """The routing shape records and signatures use: the active table's, else the
        configured one."""
        return self.active.table.geometry if self.active is not None else self.expected_geometry

    # --- workers -------------------------------------------------------------------------------
    def set_workers(self, workers: Sequence[tuple[str, str]]) -> None:
        """The registry's decode workers changed (join/leave): re-map zones to them.

        `workers` are (worker_id, url) pairs of every registered decode worker, healthy or not
        (health is transient and handled by the band; membership decides ownership).
        """
        self._registered = tuple(workers)
        old = self.active
        if old is None:
            return
        mapping = map_zones(old.table.workers, self._registered)
        if mapping != old.zone_workers:
            self.active = replace(old, zone_workers=mapping)
            self._publish()

    # --- triggers ------------------------------------------------------------------------------
    def changed(self) -> bool:
        """True when the file differs from the one last read (or failed to be read)."""
        return self.path is not None and fingerprint(self.path) != self._seen

    async def watch(self, interval: float = DEFAULT_WATCH_INTERVAL_SECS) -> None:
        """Poll for changes forever (cancel the task to stop); reload when the file changes."""
        if interval <= 0:
            raise ValueError(f"zones watch interval must be > 0, got {interval!r}")
        # The watcher is the one long-lived task the app starts for the table, so SIGHUP lives
        # as long as it does: without a handler, `kill -HUP` (the operator's reload) would
        # terminate the process (the default action).
        uninstall = self.install_sighup(asyncio.get_running_loop())
        try:
            while True:
                await asyncio.sleep(interval)
                if self.changed():
                    await self.reload()
        finally:
            uninstall()

    def reload_soon(self) -> asyncio.Task[ReloadResult]:
        """Schedule a reload on the running loop (signal handlers cannot await)."""
        task = asyncio.get_running_loop().create_task(self.reload())
        self._tasks.add(task)  # keep a reference until done, or the task may be collected
        task.add_done_callback(self._tasks.discard)
        return task

    def install_sighup(self, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
        """Reload on SIGHUP; returns the function that removes the handler. No-op off Unix."""
        try:
            loop.add_signal_handler(signal.SIGHUP, self.reload_soon)
        except (NotImplementedError, AttributeError, RuntimeError, ValueError):
            # ValueError: not the main thread (signal.set_wakeup_fd), e.g. a loop in a thread.
            log.warning("SIGHUP reload unavailable here (platform or not the main thread)")
            return lambda: None

        def uninstall() -> None:
            loop.remove_signal_handler(signal.SIGHUP)

        return uninstall

    # --- admin ---------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """What `GET /zones` returns."""
        a = self.active
        doc: dict[str, Any] = {
            "path": self.path,
            "active": a is not None,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "last_attempt_at": self.last_attempt_at,
            "model_geometry": None if self.expected_geometry is None
            else self.expected_geometry.to_dict(),
        }
        if a is not None:
            doc.update(
                version=a.version,
                checksum=a.checksum,
                generation=a.generation,
                loaded_at=a.loaded_at,
                num_zones=a.table.num_zones,
                dim=a.table.spec.dim,
                geometry=a.table.geometry.to_dict(),
                tau=a.table.tau,
                min_candidates=a.table.min_candidates,
                load_bound=a.table.load_bound,
                predictor=a.table.predictor is not None,
                # The table's names are free strings: never echo credentials written into one.
                workers=[
                    {"zone": k, "table_worker": redact_url(t),
                     "worker": None if w is None else redact_url(w)}
                    for k, (t, w) in enumerate(zip(a.table.workers, a.zone_workers, strict=True))
                ],
            )
        return doc

