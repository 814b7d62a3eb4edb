"""Kubernetes service discovery (gateway/discovery.py) against a fake API server that speaks the
real list and watch protocol, with emulated SGLang workers as the pods.

The fake serves `GET /api/v1/namespaces/{ns}/pods` and `/api/v1/pods`: a list (equality label
selectors, `metadata.resourceVersion`), or with `watch=true` newline-delimited JSON watch events
from `resourceVersion` on, filtered as the API server's watch cache filters them (an object that
stops matching the selector arrives as DELETED, one that starts matching as ADDED), ended after
`timeoutSeconds`; a version older than its horizon gets the 410 `Expired` ERROR event. The
gateway's `kubernetes` client reaches it through a kubeconfig file ($KUBECONFIG), as kubectl
would. Pods share one port on distinct loopback addresses (127.0.0.2, ...), as pods of one
Deployment share a container port on distinct IPs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway.cli import settings_from_args
from gateway.config import Settings
from gateway.discovery import (
    DiscoveryConfig,
    desired_workers,
    load_kube_configuration,
    pod_workers,
    why_gone,
)
from gateway.errors import ConfigError
from loadtest.emulator.config import EngineOptions, WorkerConfig
from loadtest.emulator.server import WorkerServer
from tests.gateway_server import running_gateway

NS = "llm"
RESYNC = 2.0  # --service-discovery-resync-secs of the gateways below
_uids = itertools.count(1)


def make_pod(name: str, ip: str | None, labels: dict[str, str], *, ready: bool = True,
             phase: str = "Running", annotations: dict[str, str] | None = None,
             namespace: str = NS) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase, "conditions": [
        {"type": "Ready", "status": "True" if ready else "False"}]}
    if ip is not None:
        status["podIP"] = ip
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{next(_uids)}",
                         "labels": dict(labels), "annotations": dict(annotations or {})},
            "status": status}


def _selector_matches(selector: str, pod: dict[str, Any] | None) -> bool:
    if pod is None:
        return False
    labels = pod["metadata"].get("labels") or {}
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


class FakeApiServer:
    """The pods API of a Kubernetes API server: list, watch, resource versions, expiry."""

    def __init__(self) -> None:
        self.pods: dict[str, dict[str, Any]] = {}
        self.rv = 1
        self.horizon = 0  # watching from a version below this answers 410 Gone
        # (version, previous object or None, current object, deleted?)
        self.log: list[tuple[int, dict[str, Any] | None, dict[str, Any], bool]] = []
        self.lists = 0
        self.forbidden_lists = 0  # the next lists answered 403 (RBAC not granted yet)
        self.watches = 0
        self.gone_sent = 0
        self._changed = asyncio.Condition()
        self._drop_epoch = 0
        self._abrupt = False
        self._runner: web.AppRunner | None = None
        self.url = ""

    # --- the test's side ---
    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self._pods)
        app.router.add_get("/api/v1/pods", self._pods)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        await self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _commit(self, prev: dict[str, Any] | None, cur: dict[str, Any], deleted: bool,
                      quiet: bool) -> None:
        """A change at a new version; `quiet`: no watch event (one a watch missed)."""
        self.rv += 1
        cur["metadata"]["resourceVersion"] = str(self.rv)
        key = f"{cur['metadata']['namespace']}/{cur['metadata']['name']}"
        if deleted:
            self.pods.pop(key, None)
        else:
            self.pods[key] = cur
        if not quiet:
            self.log.append((self.rv, prev, cur, deleted))
        async with self._changed:
            self._changed.notify_all()

    async def put(self, pod: dict[str, Any], *, quiet: bool = False) -> None:
        key = f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"
        prev = self.pods.get(key)
        await self._commit(None if prev is None else orjson.loads(orjson.dumps(prev)),
                           orjson.loads(orjson.dumps(pod)), False, quiet)

    async def edit(self, name: str, change: Callable[[dict[str, Any]], None], *,
                   quiet: bool = False, namespace: str = NS) -> None:
        prev = self.pods[f"{namespace}/{name}"]
        cur = orjson.loads(orjson.dumps(prev))
        change(cur)
        await self._commit(prev, cur, False, quiet)

    async def delete(self, name: str, *, quiet: bool = False, namespace: str = NS) -> None:
        pod = self.pods[f"{namespace}/{name}"]
        await self._commit(pod, orjson.loads(orjson.dumps(pod)), True, quiet)

    async def drop_watches(self, *, abrupt: bool = False) -> None:
        """End every open watch: cleanly (the API server's own stream end) or by closing the
        connection mid-stream (a load balancer cutting it)."""
        self._drop_epoch += 1
        self._abrupt = abrupt
        async with self._changed:
            self._changed.notify_all()

    async def expire(self) -> None:
        """Compact the history: open watches get the 410 ERROR event, and so does a watch
        resumed from any version seen so far; a fresh list gives a version that works."""
        self.rv += 1
        self.horizon = self.rv
        async with self._changed:
            self._changed.notify_all()

    # --- the API ---
    async def _pods(self, request: web.Request) -> web.StreamResponse:
        namespace = request.match_info.get("ns")
        selector = request.query.get("labelSelector", "")
        if request.query.get("watch", "").lower() in ("true", "1"):
            return await self._watch(request, namespace, selector)
        if self.forbidden_lists > 0:
            self.forbidden_lists -= 1
            return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                      "reason": "Forbidden", "code": 403,
                                      "message": "pods is forbidden"}, status=403)
        self.lists += 1
        items = [p for p in self.pods.values()
                 if (namespace is None or p["metadata"]["namespace"] == namespace)
                 and _selector_matches(selector, p)]
        return web.json_response({"kind": "PodList", "apiVersion": "v1",
                                  "metadata": {"resourceVersion": str(self.rv)},
                                  "items": items})

    def _visible(self, namespace: str | None, pod: dict[str, Any] | None) -> bool:
        return pod is not None and (namespace is None or pod["metadata"]["namespace"] == namespace)

    async def _watch(self, request: web.Request, namespace: str | None,
                     selector: str) -> web.StreamResponse:
        self.watches += 1
        cursor = int(request.query.get("resourceVersion") or self.rv)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)

        async def send(kind: str, obj: dict[str, Any]) -> None:
            await response.write(orjson.dumps({"type": kind, "object": obj}) + b"\n")

        with contextlib.suppress(ConnectionResetError):  # the client left (gateway stopped)
            await self._stream(request, response, send, namespace, selector, cursor)
        return response

    async def _stream(self, request: web.Request, response: web.StreamResponse,
                      send: Callable[[str, dict[str, Any]], Any], namespace: str | None,
                      selector: str, cursor: int) -> None:
        deadline = time.monotonic() + float(request.query.get("timeoutSeconds", "1800"))
        epoch = self._drop_epoch
        while True:
            if cursor < self.horizon:
                self.gone_sent += 1
                await send("ERROR", {"kind": "Status", "apiVersion": "v1", "metadata": {},
                                     "status": "Failure", "reason": "Expired", "code": 410,
                                     "message": f"too old resource version: {cursor}"})
                break
            for version, prev, cur, deleted in self.log:
                if version <= cursor:
                    continue
                cursor = version
                was = self._visible(namespace, prev) and _selector_matches(selector, prev)
                now = self._visible(namespace, cur) and _selector_matches(selector, cur)
                if deleted and was:
                    await send("DELETED", cur)
                elif not deleted and now:
                    await send("MODIFIED" if was else "ADDED", cur)
                elif not deleted and was:
                    await send("DELETED", cur)  # left the selector: gone from this watch
            cursor = max(cursor, self.rv)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or epoch != self._drop_epoch:
                break
            async with self._changed:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)
            if epoch != self._drop_epoch and self._abrupt:
                assert request.transport is not None
                request.transport.abort()
                return
        await response.write_eof()


@pytest.fixture
async def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeApiServer]:
    server = FakeApiServer()
    await server.start()
    kubeconfig = tmp_path / "kubeconfig.yaml"
    kubeconfig.write_text(orjson.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": server.url}}],
        "users": [{"name": "gateway", "user": {"token": "test-token"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "gateway"}}],
    }).decode())  # JSON is YAML
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not "in a cluster"
    yield server
    await server.close()


@contextlib.asynccontextmanager
async def workers_on(hosts: list[str], role: str = "regular"
                     ) -> AsyncIterator[tuple[int, list[WorkerServer]]]:
    """Emulated workers on the given loopback addresses, all on one port (a pod port)."""
    started: list[WorkerServer] = []
    port = 0
    try:
        for host in hosts:
            server = WorkerServer(WorkerConfig(role=role, host=host, port=port,  # type: ignore[arg-type]
                                               engine=EngineOptions(instant=True)))
            await server.start()
            started.append(server)
            port = server.port or 0
        yield port, started
    finally:
        for server in started:
            await server.stop()


def discovery_settings(**kw: Any) -> Settings:
    base: dict[str, Any] = dict(
        service_discovery=True, service_discovery_namespace=NS,
        service_discovery_resync_secs=RESYNC, prometheus_port=0, load_poll_interval_secs=0,
        health_check_interval_secs=0.2, health_check_timeout_secs=1.0,
        worker_startup_check_interval=0.1, request_timeout_secs=10.0,
        retry_initial_backoff_ms=1, retry_max_backoff_ms=5)
    base.update(kw)
    return Settings(**base)


async def listed(session: aiohttp.ClientSession, gateway: str) -> dict[str, dict[str, Any]]:
    async with session.get(gateway + "/workers") as r:
        assert r.status == 200
        return {w["url"]: w for w in (await r.json())["workers"]}


async def eventually(check: Callable[[], Any], within: float, what: str) -> None:
    """Poll the async `check` until it is truthy; fail naming `what` after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within:.1f} s: {what}")
        await asyncio.sleep(0.05)


def _labels(value: str) -> Callable[[dict[str, Any]], None]:
    def change(pod: dict[str, Any]) -> None:
        pod["metadata"]["labels"]["app"] = value
    return change


def _ready(ready: bool) -> Callable[[dict[str, Any]], None]:
    def change(pod: dict[str, Any]) -> None:
        pod["status"]["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]
    return change


# --- pure rules (smg's PodInfo / compute_desired_state) --------------------------------------

PD_CONFIG = DiscoveryConfig(pd=True, selector={}, prefill_selector={"app": "s", "role": "p"},
                            decode_selector={"app": "s", "role": "d"}, port=8000, namespace=None,
                            bootstrap_port_annotation="sglang.ai/bootstrap-port", resync_secs=60)


def test_roles_readiness_ports_and_bootstrap_annotation() -> None:
    prefill = make_pod("p", "10.0.0.1", {"app": "s", "role": "p"},
                       annotations={"sglang.ai/bootstrap-port": "8998"})
    decode = make_pod("d", "10.0.0.2", {"app": "s", "role": "d", "extra": "x"},
                      annotations={"sglang.ai/bootstrap-port": "8998"})
    (p,), (d,) = pod_workers(prefill, PD_CONFIG), pod_workers(decode, PD_CONFIG)
    assert (p.url, p.role, p.bootstrap_port) == ("http://10.0.0.1:8000", "prefill", 8998)
    assert (d.url, d.role, d.bootstrap_port) == ("http://10.0.0.2:8000", "decode", None)
    assert PD_CONFIG.list_label_selector() == "app=s"  # the labels both role selectors share
    for pod in (make_pod("a", "10.0.0.3", {"app": "s"}),  # neither role
                make_pod("b", "10.0.0.4", {"app": "s", "role": "p"}, ready=False),
                make_pod("c", "10.0.0.5", {"app": "s", "role": "p"}, phase="Pending"),
                make_pod("e", None, {"app": "s", "role": "p"})):  # scheduled, no IP yet
        assert pod_workers(pod, PD_CONFIG) == []
    terminating = make_pod("t", "10.0.0.6", {"app": "s", "role": "d"})
    terminating["metadata"]["deletionTimestamp"] = "2026-12-03T00:00:00Z"
    assert pod_workers(terminating, PD_CONFIG) == []
    assert why_gone(terminating, PD_CONFIG) == "pod terminating"
    assert why_gone(None, PD_CONFIG) == "pod deleted or relabelled out of the selector"


def test_worker_ports_annotation_and_per_port_bootstrap_ports() -> None:
    pod = make_pod("p", "fd00::1", {"app": "s", "role": "p"}, annotations={
        "smg.ai/worker-ports": "8000,8001,8000", "sglang.ai/bootstrap-port": "9000,9001"})
    assert [(w.url, w.bootstrap_port) for w in pod_workers(pod, PD_CONFIG)] == [
        ("http://[fd00::1]:8000", 9000), ("http://[fd00::1]:8001", 9001)]
    pod["metadata"]["annotations"]["sglang.ai/bootstrap-port"] = "9000,9001,9002"  # misaligned
    assert [w.bootstrap_port for w in pod_workers(pod, PD_CONFIG)] == [None, None]
    pod["metadata"]["annotations"]["smg.ai/worker-ports"] = "http"  # invalid: the flag's port
    assert [w.url for w in pod_workers(pod, PD_CONFIG)] == ["http://[fd00::1]:8000"]
    twin = make_pod("q", "fd00::1", {"app": "s", "role": "d"})  # same IP:port: first pod keeps it
    assert desired_workers([pod, twin], PD_CONFIG)["http://[fd00::1]:8000"].role == "prefill"


def test_flags_and_validation() -> None:
    settings = settings_from_args(
        ["--pd-disaggregation", "--service-discovery", "--prefill-selector", "app=s role=p",
         "--decode-selector", "app=s", "role=d", "--service-discovery-port", "30000",
         "--service-discovery-namespace", "llm"], env={})
    config = DiscoveryConfig.from_settings(settings)
    assert config.prefill_selector == {"app": "s", "role": "p"}
    assert config.decode_selector == {"app": "s", "role": "d"}
    assert (config.port, config.namespace, config.resync_secs) == (30000, "llm", 60.0)
    env = settings_from_args([], env={"GATEWAY_SERVICE_DISCOVERY": "1",
                                      "GATEWAY_SELECTOR": "app=s,tier=w"})
    assert DiscoveryConfig.from_settings(env).selector == {"app": "s", "tier": "w"}
    for argv, message in (
            (["--service-discovery"], "needs --selector"),
            (["--pd-disaggregation", "--service-discovery", "--selector", "app=s"],
             "--prefill-selector"),
            (["--service-discovery", "--selector", "app"], "key=value"),
            (["--service-discovery", "--selector", "a=b", "--service-discovery-port", "0"],
             "service_discovery_port"),
            (["--service-discovery", "--selector", "a=b",
              "--service-discovery-resync-secs", "0"], "service_discovery_resync_secs")):
        with pytest.raises(ConfigError, match=message):
            settings_from_args(argv, env={})
    # smg 1.13's spelling: --discovery-provider kubernetes is --service-discovery; file is
    # refused by name
    smg = settings_from_args(["--discovery-provider", "kubernetes", "--selector", "app=s"],
                             env={})
    assert smg.service_discovery and DiscoveryConfig.from_settings(smg).selector == {"app": "s"}
    with pytest.raises(ConfigError, match="--discovery-provider file"):
        settings_from_args(["--discovery-provider", "file"], env={})


def test_no_kubernetes_configuration_is_a_config_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="no Kubernetes API configuration"):
        load_kube_configuration()


# --- against the fake API server --------------------------------------------------------------

async def test_pods_join_and_leave_rotation(api: FakeApiServer) -> None:
    hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    async with workers_on(hosts) as (port, _), aiohttp.ClientSession() as s:
        urls = [f"http://{h}:{port}" for h in hosts]
        sel = {"app": "sglang"}
        await api.put(make_pod("w1", hosts[0], sel))
        await api.put(make_pod("w2", hosts[1], sel, ready=False))
        await api.put(make_pod("w3", hosts[2], {"app": "other"}))
        await api.put(make_pod("elsewhere", hosts[2], sel, namespace="other-ns"))
        settings = discovery_settings(selector=["app=sglang"], service_discovery_port=port)
        async with running_gateway(settings) as (gw, state):
            async def rotation() -> set[str]:
                return {w.url for w in state.workers.available("regular")}

            async def only(*expected: str) -> bool:
                return await rotation() == set(expected)

            await eventually(lambda: only(urls[0]), RESYNC, "the ready pod in rotation")
            async with s.post(gw + "/generate", json={
                    "text": "hi", "sampling_params": {"max_new_tokens": 2}}) as r:
                assert r.status == 200, await r.text()
            shown = await listed(s, gw)
            assert shown[urls[0]]["worker_type"] == "regular" and shown[urls[0]]["is_healthy"]
            assert set(shown) == {urls[0]}  # not the unready pod, nor the other namespace's

            await api.edit("w2", _ready(True))  # becomes Ready
            await eventually(lambda: only(urls[0], urls[1]), RESYNC, "w2 in once Ready")
            await api.edit("w3", _labels("sglang"))  # relabelled into the selector
            await eventually(lambda: only(*urls), RESYNC, "w3 in once relabelled")
            await api.edit("w1", _labels("other"))  # relabelled out of it
            await eventually(lambda: only(urls[1], urls[2]), RESYNC, "w1 out once relabelled")
            await api.delete("w2")
            await eventually(lambda: only(urls[2]), RESYNC, "w2 out once deleted")
            await api.edit("w3", _ready(False))  # readiness probe failing
            await eventually(lambda: only(), RESYNC, "w3 out once not Ready")

            async def none_registered() -> bool:
                return len(await listed(s, gw)) == 0
            await eventually(none_registered, 1.0, "no worker left registered")
            assert api.gone_sent == 0

        async def thread_ended() -> bool:
            return not any(t.name == "k8s-discovery" for t in threading.enumerate())
        await eventually(thread_ended, 5.0, "the list/watch thread ends with the gateway")


async def test_health_check_gates_rotation_and_manual_workers_are_left_alone(
        api: FakeApiServer) -> None:
    async with workers_on(["127.0.0.2", "127.0.0.3"]) as (port, (up, manual)), \
            aiohttp.ClientSession() as s:
        # A Ready pod whose server does not answer on the port stays out of rotation.
        await api.put(make_pod("down", "127.0.0.5", {"app": "sglang"}))
        await api.put(make_pod("up", "127.0.0.2", {"app": "sglang"}))
        settings = discovery_settings(selector=["app=sglang"], service_discovery_port=port,
                                      worker_urls=[manual.url])
        async with running_gateway(settings) as (gw, state):
            down = f"http://127.0.0.5:{port}"

            async def up_in_down_out() -> bool:
                shown = await listed(s, gw)
                return (shown.get(up.url, {}).get("is_healthy") is True
                        and shown.get(down, {}).get("is_healthy") is False)
            await eventually(up_in_down_out, RESYNC, "registered; only the healthy one in")
            # A pod claiming the manual worker's address does not take it over, nor remove it.
            await api.put(make_pod("twin", "127.0.0.3", {"app": "sglang"}))
            await asyncio.sleep(0.5)
            await api.delete("twin")
            await asyncio.sleep(0.5)
            assert state.workers.find(manual.url) is not None
            # DELETE /workers of a discovered worker: the pod is still there, so it returns.
            async with s.delete(gw + "/workers/" + up.url) as r:
                assert r.status == 202
            await eventually(lambda: _has(state, up.url), RESYNC + 1, "re-added after DELETE")


async def _has(state: Any, url: str) -> bool:
    return state.workers.find(url) is not None


async def test_api_errors_are_retried(api: FakeApiServer) -> None:
    async with workers_on(["127.0.0.2"]) as (port, _):
        await api.put(make_pod("a", "127.0.0.2", {"app": "sglang"}))
        api.forbidden_lists = 2  # retried after 1 s, then 2 s
        settings = discovery_settings(selector=["app=sglang"], service_discovery_port=port)
        async with running_gateway(settings) as (_, state):
            async def joined() -> bool:
                return bool(state.workers.available("regular"))
            await eventually(joined, 3 + RESYNC, "joined once the API answers")
            assert api.forbidden_lists == 0 and api.lists >= 1


@pytest.mark.parametrize("how", ["closed", "aborted", "gone", "resync"])
async def test_missed_events_are_recovered_by_a_relist(api: FakeApiServer, how: str) -> None:
    hosts = ["127.0.0.2", "127.0.0.3"]
    async with workers_on(hosts) as (port, _):
        urls = [f"http://{h}:{port}" for h in hosts]
        await api.put(make_pod("a", hosts[0], {"app": "sglang"}))
        settings = discovery_settings(selector=["app=sglang"], service_discovery_port=port)
        async with running_gateway(settings) as (_, state):
            async def rotation() -> set[str]:
                return {w.url for w in state.workers.available("regular")}

            async def is_(*expected: str) -> bool:
                return await rotation() == set(expected)
            await eventually(lambda: is_(urls[0]), RESYNC, "first pod in")

            async def watching() -> bool:
                return api.watches >= 1
            await eventually(watching, RESYNC, "the watch is open")
            lists = api.lists
            # Changes the watch never delivers (events lost): one pod gone, one new.
            await api.delete("a", quiet=True)
            await api.put(make_pod("b", hosts[1], {"app": "sglang"}), quiet=True)
            await asyncio.sleep(0.3)
            assert await rotation() == {urls[0]}, "a quiet change must not reach the watch"
            if how == "closed":
                await api.drop_watches()
            elif how == "aborted":
                await api.drop_watches(abrupt=True)
            elif how == "gone":
                await api.expire()
            # "resync": nothing; the watch's timeoutSeconds ends it and a re-list follows.
            # The aborted stream is retried after a 1 s back-off.
            await eventually(lambda: is_(urls[1]), RESYNC + 1.5, f"re-list after {how}")
            assert api.lists > lists
            if how == "gone":
                assert api.gone_sent >= 1


async def test_pd_discovery_serves_requests(api: FakeApiServer) -> None:
    async with workers_on(["127.0.0.2"], "prefill") as (port, (prefill,)), \
            workers_on(["127.0.0.3"], "decode") as (_, (decode,)), \
            aiohttp.ClientSession() as s:
        # The decode listens on its own port: given per pod by smg's worker-ports annotation.
        await api.put(make_pod("prefill-0", "127.0.0.2", {"app": "sglang", "role": "prefill"},
                               annotations={"sglang.ai/bootstrap-port":
                                            str(prefill.bootstrap_port)}))
        await api.put(make_pod("decode-0", "127.0.0.3", {"app": "sglang", "role": "decode"},
                               annotations={"smg.ai/worker-ports": str(decode.port)}))
        await api.put(make_pod("router", "127.0.0.4", {"app": "sglang", "role": "router"}))
        # No namespace: every namespace's pods (GET /api/v1/pods), as the Rust routers.
        settings = discovery_settings(pd_disaggregation=True, service_discovery_port=port,
                                      service_discovery_namespace=None,
                                      prefill_selector=["app=sglang", "role=prefill"],
                                      decode_selector=["app=sglang", "role=decode"])
        async with running_gateway(settings) as (gw, state):
            async def both_in() -> bool:
                return bool(state.workers.available("prefill")
                            and state.workers.available("decode"))
            await eventually(both_in, RESYNC, "prefill and decode in rotation")
            shown = await listed(s, gw)
            assert shown[prefill.url]["worker_type"] == "prefill"
            assert shown[prefill.url]["bootstrap_port"] == prefill.bootstrap_port
            assert shown[decode.url]["worker_type"] == "decode"
            assert len(shown) == 2  # the router pod matches neither role
            async with s.get(gw + "/readiness") as r:
                assert r.status == 200
            async with s.post(gw + "/generate", json={
                    "text": "Hello", "sampling_params": {"max_new_tokens": 4}}) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["text"]
            async with s.post(gw + "/v1/chat/completions", json={
                    "model": "m", "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 3, "stream": True}) as r:
                assert r.status == 200
                assert (await r.read()).rstrip().endswith(b"data: [DONE]")


def test_no_kubernetes_configuration_is_a_one_line_start_up_error(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "KUBECONFIG": str(tmp_path / "missing"), "HOME": str(tmp_path)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "--pd-disaggregation", "--service-discovery",
         "--prefill-selector", "app=p", "--decode-selector", "app=d"],
        capture_output=True, text=True, timeout=60, env=env, check=False)
    assert proc.returncode == 2
    assert "configuration error: service_discovery: no Kubernetes API configuration" \
        in proc.stderr
    assert "Traceback" not in proc.stderr
