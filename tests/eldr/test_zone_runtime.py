"""Zone table runtime: load/validate/swap, corrupt files, file watching (mtime touch, ConfigMap
symlink swap), SIGHUP, admin endpoints, metrics, and re-mapping zones when workers come and go."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from prometheus_client import CollectorRegistry

from gateway import admin
from gateway.circuit import BreakerConfig
from gateway.config import Settings
from gateway.eldr.locality import Locality
from gateway.eldr.metrics import EldrMetrics
from gateway.eldr.resolver import LocalityResolver, SignatureResolver
from gateway.eldr.runtime import ReloadResult, ZoneRuntime, map_zones
from gateway.errors import ConflictError
from gateway.metrics import GatewayMetrics
from gateway.state import STATE, GatewayState
from gateway.workers import WorkerRegistry
from tests.eldr.helpers import table
from zones.table import COMPACT_SCHEMA_VERSION, ZoneTable, convert, save_table, table_to_json

CENTROIDS = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]


def table_v(version: str, workers: list[str] | None = None) -> ZoneTable:
    return table(CENTROIDS, workers or ["a", "b", "c"], provenance={"version": version})


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


def load(rt: ZoneRuntime) -> ReloadResult:
    """A reload from synchronous code (its own event loop), as start-up would run it."""
    return asyncio.run(rt.reload())


def zone_app(rt: ZoneRuntime) -> web.Application:
    """The admin routes over an app state holding `rt` (what create_app builds with --zones)."""
    registry = CollectorRegistry()
    state = GatewayState(Settings(zones=rt.path), registry, GatewayMetrics(registry),
                         WorkerRegistry(BreakerConfig(), 5.0))
    if rt.path is not None:
        state.locality = Locality(rt, EldrMetrics(registry),
                                  LocalityResolver(SignatureResolver(rt)), None)
    app = web.Application()
    app[STATE] = state
    admin.add_routes(app)
    return app


def reload_count(registry: CollectorRegistry, result: str) -> float:
    return registry.get_sample_value("eldr_zone_reloads_total", {"result": result}) or 0.0


def test_load_swap_and_keep_old_on_corrupt_file(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    path = tmp_path / "zones.json"
    save_table(table_v("v1"), path)
    rt = ZoneRuntime(path, metrics=EldrMetrics(registry))
    assert rt.active is None and registry.get_sample_value("eldr_zone_table_zones") == 0
    first = load(rt)
    assert first.status == "loaded" and rt.active is not None and rt.active.version == "v1"
    v1 = rt.active
    assert registry.get_sample_value(
        "eldr_zone_table_info", {"version": "v1", "checksum": v1.checksum}
    ) == 1

    path.write_bytes(path.read_bytes()[:100])  # truncated mid-write
    bad = load(rt)
    assert bad.status == "failed" and rt.active is v1  # old table keeps serving
    assert bad.error is not None and "document: not valid JSON" in bad.error
    assert rt.info()["last_error"] == bad.error and rt.info()["version"] == "v1"

    save_table(table_v("v2"), path)  # then edited by hand: the checksum no longer matches
    path.write_text(path.read_text().replace('"v2"', '"v3"'))
    tampered = load(rt)
    assert tampered.status == "failed" and "checksum: mismatch" in (tampered.error or "")
    assert rt.active is v1

    save_table(table_v("v2"), path)
    ok = load(rt)
    assert ok.status == "loaded" and rt.active.version == "v2" and rt.active.generation == 2
    assert rt.last_error is None
    assert registry.get_sample_value(
        "eldr_zone_table_info", {"version": "v1", "checksum": v1.checksum}
    ) is None
    assert (reload_count(registry, "loaded"), reload_count(registry, "failed")) == (2, 2)


def test_same_content_is_unchanged_not_swapped(tmp_path: Path) -> None:
    path = tmp_path / "zones.json"
    save_table(table_v("v1"), path)
    rt = ZoneRuntime(path)
    load(rt)
    before = rt.active
    assert load(rt).status == "unchanged" and rt.active is before


def test_missing_path_and_unexpected_loader_errors_are_contained(tmp_path: Path) -> None:
    rt = ZoneRuntime(tmp_path / "absent.json")
    res = load(rt)
    assert res.status == "failed" and "file: cannot read" in (res.error or "")
    assert load(ZoneRuntime(None)).error == "zones: no zone table path configured (--zones)"

    def boom(_: str) -> ZoneTable:
        raise RuntimeError("disk on fire")

    res = load(ZoneRuntime(tmp_path / "x", loader=boom))
    assert res.status == "failed" and "disk on fire" in (res.error or "")


async def test_watcher_reloads_on_change_touch_and_configmap_swap(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    # Kubernetes ConfigMap volume layout: zones.json -> ..data/zones.json, ..data -> ..<ts>/
    (tmp_path / "..2026_01").mkdir()
    save_table(table_v("v1"), tmp_path / "..2026_01" / "zones.json")
    os.symlink("..2026_01", tmp_path / "..data")
    os.symlink("..data/zones.json", tmp_path / "zones.json")
    rt = ZoneRuntime(tmp_path / "zones.json", metrics=EldrMetrics(registry))
    await rt.reload()
    watcher = asyncio.create_task(rt.watch(interval=0.02))
    try:
        # mtime-only touch: re-read, same checksum -> "unchanged", table object kept.
        v1 = rt.active
        st = os.stat(tmp_path / "zones.json")
        os.utime(tmp_path / "zones.json", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        await until(lambda: reload_count(registry, "unchanged") == 1)
        assert rt.active is v1

        # ConfigMap update: new timestamped dir, atomic swap of the ..data symlink.
        (tmp_path / "..2026_02").mkdir()
        save_table(table_v("v2"), tmp_path / "..2026_02" / "zones.json")
        os.symlink("..2026_02", tmp_path / "..data_tmp")
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
        await until(lambda: rt.active is not None and rt.active.version == "v2")

        # A corrupt update is rejected once (not on every poll) and v2 keeps serving.
        (tmp_path / "..2026_03").mkdir()
        (tmp_path / "..2026_03" / "zones.json").write_text('{"schema_version": 1}')
        os.symlink("..2026_03", tmp_path / "..data_tmp")
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
        await until(lambda: reload_count(registry, "failed") == 1)
        assert "missing" in (rt.last_error or "")
        v2 = rt.active
        failed_at = rt.last_attempt_at
        await until(lambda: not rt.changed())
        for _ in range(5):  # several poll intervals pass without another attempt
            await asyncio.sleep(0.03)
        assert reload_count(registry, "failed") == 1 and rt.last_attempt_at == failed_at
        assert rt.active is v2 and v2 is not None and v2.version == "v2"
    finally:
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher


def configmap_update(mount: Path, stamp: str, files: dict[str, bytes]) -> None:
    """What kubelet's atomic writer does to a mounted ConfigMap volume on an update: write the
    keys into a new timestamped directory, point a temporary symlink at it, rename that over
    `..data` (atomic), then delete the previous timestamped directory. The visible
    `zones.json -> ..data/zones.json` link itself never changes."""
    new_dir = mount / f"..{stamp}"
    new_dir.mkdir()
    for name, data in files.items():
        (new_dir / name).write_bytes(data)
    old = os.readlink(mount / "..data") if (mount / "..data").is_symlink() else None
    os.symlink(new_dir.name, mount / "..data_tmp")
    os.replace(mount / "..data_tmp", mount / "..data")
    for name in files:
        if not (mount / name).is_symlink():
            os.symlink(f"..data/{name}", mount / name)
    if old is not None:
        for child in (mount / old).iterdir():
            child.unlink()
        (mount / old).rmdir()


async def test_configmap_swap_of_compact_tables_and_a_corrupt_one(tmp_path: Path) -> None:
    registry = CollectorRegistry()

    def compact(version: str) -> bytes:
        return table_to_json(convert(table_v(version), COMPACT_SCHEMA_VERSION))

    configmap_update(tmp_path, "2026_12_03_01_00_00.000000001", {"zones.json": compact("v1")})
    rt = ZoneRuntime(tmp_path / "zones.json", metrics=EldrMetrics(registry))
    assert (await rt.reload()).status == "loaded"
    assert rt.active is not None and rt.active.table.schema_version == 2
    watcher = asyncio.create_task(rt.watch(interval=0.02))
    try:
        configmap_update(tmp_path, "2026_12_03_01_01_00.000000002", {"zones.json": compact("v2")})
        await until(lambda: rt.active is not None and rt.active.version == "v2")
        v2 = rt.active

        # A corrupt compact table (its centroid stream cut short) is rejected naming the field;
        # v2 keeps serving even though the directory it was read from is gone.
        doc = json.loads(compact("v3"))
        doc["centroids"]["data"] = doc["centroids"]["data"][:-12]
        configmap_update(tmp_path, "2026_12_03_01_02_00.000000003",
                         {"zones.json": json.dumps(doc).encode()})
        await until(lambda: reload_count(registry, "failed") == 1)
        assert (rt.last_error or "").count("centroids:") == 1, rt.last_error
        assert rt.active is v2
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith("..2026")] == [
            "..2026_12_03_01_02_00.000000003"]

        configmap_update(tmp_path, "2026_12_03_01_03_00.000000004", {"zones.json": compact("v4")})
        await until(lambda: rt.active is not None and rt.active.version == "v4")
        assert rt.last_error is None and rt.active.generation == 3
    finally:
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher


async def test_watch_rejects_bad_interval() -> None:
    with pytest.raises(ValueError, match="interval"):
        await ZoneRuntime(None).watch(0)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGHUP is Unix-only")
async def test_sighup_triggers_reload(tmp_path: Path) -> None:
    path = tmp_path / "zones.json"
    save_table(table_v("v1"), path)
    rt = ZoneRuntime(path)
    await rt.reload()
    save_table(table_v("v2"), path)
    uninstall = rt.install_sighup(asyncio.get_running_loop())
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: rt.active is not None and rt.active.version == "v2")
    finally:
        uninstall()


async def test_admin_endpoints(tmp_path: Path) -> None:
    path = tmp_path / "zones.json"
    save_table(table_v("v1"), path)
    rt = ZoneRuntime(path)
    async with TestClient(TestServer(zone_app(rt))) as client:
        resp = await client.get("/zones")
        assert resp.status == 200 and (await resp.json())["active"] is False
        resp = await client.post("/admin/zones/reload")
        body = await resp.json()
        assert resp.status == 200 and body["result"] == "loaded"
        assert body["zones"]["version"] == "v1" and body["zones"]["num_zones"] == 3
        assert body["zones"]["checksum"].startswith("sha256:")
        assert [w["worker"] for w in body["zones"]["workers"]] == ["a", "b", "c"]
        path.write_text("not json")
        resp = await client.post("/admin/zones/reload")
        body = await resp.json()
        assert resp.status == 422 and body["result"] == "failed"
        assert "not valid JSON" in body["error"]["message"] and body["zones"]["version"] == "v1"
        resp = await client.get("/zones")
        assert (await resp.json())["last_error"] == body["error"]["message"]


async def test_admin_zone_routes_without_zones_are_a_conflict() -> None:
    app = zone_app(ZoneRuntime(None))
    assert not any(r.resource is not None and r.resource.canonical == "/zones"
                   for r in app.router.routes())  # not mounted without --zones
    for handler in (admin.reload_zones, admin.show_zones):
        with pytest.raises(ConflictError, match="--zones"):
            await handler(make_mocked_request("POST", "/admin/zones/reload", app=app))


async def test_concurrent_reloads_are_serialised(tmp_path: Path) -> None:
    path = tmp_path / "zones.json"
    save_table(table_v("v1"), path)
    rt = ZoneRuntime(path)
    results = await asyncio.gather(*(rt.reload() for _ in range(5)))
    assert sorted(r.status for r in results) == ["loaded"] + ["unchanged"] * 4
    assert rt.active is not None and rt.active.generation == 1


def test_map_zones_by_id_or_url_and_orphan_handover() -> None:
    table_workers = ["http://d0:1", "d1", "http://d2:1/"]
    regs = [("d0", "http://d0:1/"), ("d1", "http://d1:1"), ("d2", "http://d2:1")]
    assert map_zones(table_workers, regs) == ("d0", "d1", "d2")
    assert map_zones(table_workers, None) == tuple(table_workers)
    # d1 leaves, two newcomers join: zone 1 goes to the first newcomer in id order.
    regs2 = [("d0", "http://d0:1"), ("d2", "http://d2:1"), ("zz", "u1"), ("n1", "u2")]
    assert map_zones(table_workers, regs2) == ("d0", "n1", "d2")
    # Nobody free: the zone stays unmapped.
    assert map_zones(table_workers, regs2[:2]) == ("d0", None, "d2")


def test_set_workers_remaps_and_original_reclaims(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    path = tmp_path / "zones.json"
    save_table(table_v("v1"), path)
    rt = ZoneRuntime(path, metrics=EldrMetrics(registry))
    rt.set_workers([("a", "ua"), ("b", "ub"), ("c", "uc")])  # before the table: remembered
    load(rt)
    assert rt.active is not None and rt.active.zone_workers == ("a", "b", "c")
    rt.set_workers([("a", "ua"), ("c", "uc")])  # b left
    assert rt.active.zone_workers == ("a", None, "c")
    assert registry.get_sample_value("eldr_zones_unmapped") == 1
    rt.set_workers([("a", "ua"), ("c", "uc"), ("new", "un")])
    assert rt.active.zone_workers == ("a", "new", "c") and rt.active.generation == 1
    rt.set_workers([("a", "ua"), ("b", "ub"), ("c", "uc"), ("new", "un")])  # b is back
    assert rt.active.zone_workers == ("a", "b", "c")
    assert registry.get_sample_value("eldr_zones_unmapped") == 0
