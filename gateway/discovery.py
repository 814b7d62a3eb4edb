"""Kubernetes service discovery: prefill, decode or regular workers from pods by label selector.

With `--service-discovery` the gateway lists the pods matching the selector(s), then watches
them, and keeps one worker per (pod IP, port) registered while its pod is eligible. Matching
and readiness follow smg's `model_gateway/src/service_discovery.rs` (`PodInfo`,
`compute_desired_state`, `compute_actions`):

- a pod matches a selector when every `key=value` of it is one of the pod's labels; an empty
  selector matches nothing. PD mode: a pod matching `--prefill-selector` is a prefill (checked
  first, as smg does), else one matching `--decode-selector` a decode; regular mode: a pod
  matching `--selector` is a regular worker;
- the list/watch asks the API server for the labels common to the role selectors (PD) or for
  `--selector` (regular); the role is then decided here from the pod's own labels;
- a pod is eligible when it has a uid and an IP, its phase is `Running`, its `Ready` condition is
  `True`, and it is not terminating (no `deletionTimestamp`: its workers leave at the start of
  the grace period, not the end);
- worker URL `http://POD_IP:PORT`, PORT being `--service-discovery-port`, or each port of the
  pod's `smg.ai/worker-ports` annotation (comma-separated, for pods running several engine
  servers; invalid: the flag's port, as smg);
- a prefill's bootstrap port is the `--bootstrap-port-annotation` annotation (default
  `sglang.ai/bootstrap-port`): one port for all of the pod's workers, or one per worker port;
  anything else is ignored with a warning (no bootstrap port), as smg;
- workers discovery did not add (command line, `POST /workers`) are never touched.

Difference from smg: a pod that stops being Ready leaves rotation at once (sglang-router
0.3.2's behaviour, and what a Kubernetes Service does with an unready endpoint); smg keeps such
workers registered and lets its health checker decide.

A discovered worker joins rotation the way `POST /workers` does (`admin.register_worker`): out
of rotation until the gateway's own health check passes. Removal (`admin.unregister_worker`)
is immediate; requests in flight finish on the worker.

The official `kubernetes` client is synchronous, so list and watch run in one daemon thread
that hands each snapshot and event to the event loop (`call_soon_threadsafe`); the pod cache and
every registry change live on the loop. Reconciliation is level-triggered, as smg's: each
change marks the cache dirty and one task diffs the eligible workers against the ones
discovery owns. A watch that ends (server timeout, dropped connection) or fails (410 Gone: its
resource version was compacted) is followed by a fresh list, which replaces the cache, so
anything missed is added or removed then; the watch is re-opened with a server timeout of
`--service-discovery-resync-secs`, which makes that re-list periodic as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import orjson

from gateway.config import Settings, parse_selector
from gateway.errors import ConfigError, ConflictError, GatewayError, NotFoundError

if TYPE_CHECKING:
    from gateway.state import GatewayState

log = logging.getLogger(__name__)

# smg's annotation listing a pod's worker ports (no flag in either router; fixed there too).
WORKER_PORTS_ANNOTATION = "smg.ai/worker-ports"
HTTP_GONE = 410
CONNECT_TIMEOUT_SECS = 10.0
LIST_READ_TIMEOUT_SECS = 60.0
# A watch's socket read timeout beyond its server-side timeout: an API server (or proxy) that
# ignores `timeoutSeconds` and goes quiet still gets the watch re-opened soon after a resync.
WATCH_READ_SLACK_SECS = 5.0
MAX_BACKOFF_SECS = 30.0

Pod = Mapping[str, Any]  # a pod as the API server's JSON, camelCase keys


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    pd: bool
    selector: dict[str, str]
    prefill_selector: dict[str, str]
    decode_selector: dict[str, str]
    port: int
    namespace: str | None
    bootstrap_port_annotation: str
    resync_secs: float

    @classmethod
    def from_settings(cls, settings: Settings) -> DiscoveryConfig:
        return cls(pd=settings.pd_disaggregation,
                   selector=parse_selector("selector", settings.selector),
                   prefill_selector=parse_selector("prefill_selector", settings.prefill_selector),
                   decode_selector=parse_selector("decode_selector", settings.decode_selector),
                   port=settings.service_discovery_port,
                   namespace=settings.service_discovery_namespace,
                   bootstrap_port_annotation=settings.bootstrap_port_annotation,
                   resync_secs=settings.service_discovery_resync_secs)

    def role_selectors(self) -> list[tuple[str, dict[str, str]]]:
        """(role, selector) in matching order; empty selectors match nothing, so are left out."""
        pairs = ([("prefill", self.prefill_selector), ("decode", self.decode_selector)]
                 if self.pd else [("regular", self.selector)])
        return [(role, sel) for role, sel in pairs if sel]

    def list_label_selector(self) -> str:
        """The API server's filter: the labels every role selector shares (smg's
        `list_label_selector`), so one list/watch covers both roles; '' filters nothing."""
        selectors = [sel for _, sel in self.role_selectors()]
        if not selectors:
            return ""
        common = {k: v for k, v in selectors[0].items()
                  if all(other.get(k) == v for other in selectors[1:])}
        return ",".join(f"{k}={v}" for k, v in sorted(common.items()))


@dataclass(frozen=True, slots=True)
class DesiredWorker:
    """One worker discovery wants registered: an engine server at a pod IP and port."""
    url: str
    role: str
    bootstrap_port: int | None
    pod: str  # namespace/name, for logs
    uid: str  # a pod recreated under the same name and IP is a new worker


def pod_key(pod: Pod) -> str:
    meta = pod.get("metadata") or {}
    return f"{meta.get('namespace') or ''}/{meta.get('name') or ''}"


def _labels(pod: Pod) -> Mapping[str, str]:
    return (pod.get("metadata") or {}).get("labels") or {}


def _annotations(pod: Pod) -> Mapping[str, str]:
    return (pod.get("metadata") or {}).get("annotations") or {}


def pod_role(pod: Pod, config: DiscoveryConfig) -> str | None:
    """The role of the first selector all of whose labels the pod carries, else None."""
    labels = _labels(pod)
    for role, selector in config.role_selectors():
        if all(labels.get(k) == v for k, v in selector.items()):
            return role
    return None


def is_ready(pod: Pod) -> bool:
    """Running, Ready condition True, and not terminating (smg's `is_healthy` plus its
    terminating check)."""
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    status = pod.get("status") or {}
    return status.get("phase") == "Running" and any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or [])


def parse_port_list(raw: str) -> list[int] | None:
    """'8000, 8001' -> [8000, 8001]; None for anything but 1..65535 integers (smg's rule)."""
    ports: list[int] = []
    for part in raw.split(","):
        try:
            port = int(part.strip())
        except ValueError:
            return None
        if not 1 <= port <= 65535:
            return None
        ports.append(port)
    return ports


def _worker_ports(pod: Pod, config: DiscoveryConfig) -> list[int]:
    raw = _annotations(pod).get(WORKER_PORTS_ANNOTATION)
    if raw is None:
        return [config.port]
    ports = parse_port_list(raw)
    if ports is None:
        log.warning("discovery: pod %s: invalid %s annotation %r; using port %d",
                    pod_key(pod), WORKER_PORTS_ANNOTATION, raw, config.port)
        return [config.port]
    return list(dict.fromkeys(ports))  # de-duplicated, in order


def _bootstrap_ports(pod: Pod, config: DiscoveryConfig, count: int) -> list[int | None]:
    raw = _annotations(pod).get(config.bootstrap_port_annotation)
    if raw is None:
        return [None] * count
    ports = parse_port_list(raw)
    if ports is not None and len(ports) == 1:
        return [ports[0]] * count
    if ports is not None and len(ports) == count:
        return list(ports)
    log.warning("discovery: pod %s: %s annotation %r does not give one port or one per worker "
                "port (%d); no bootstrap port", pod_key(pod), config.bootstrap_port_annotation,
                raw, count)
    return [None] * count


def _host(ip: str) -> str:
    try:
        return f"[{ip}]" if ipaddress.ip_address(ip).version == 6 else ip
    except ValueError:
        return ip


def pod_workers(pod: Pod, config: DiscoveryConfig) -> list[DesiredWorker]:
    """The workers an eligible pod provides; [] for a pod that is not (wrong labels, not
    ready, no IP or uid)."""
    role = pod_role(pod, config)
    meta = pod.get("metadata") or {}
    ip = (pod.get("status") or {}).get("podIP")
    uid = meta.get("uid")
    if role is None or not ip or not uid or not is_ready(pod):
        return []
    ports = _worker_ports(pod, config)
    boots = (_bootstrap_ports(pod, config, len(ports)) if role == "prefill"
             else [None] * len(ports))
    return [DesiredWorker(f"http://{_host(ip)}:{port}", role, boot, pod_key(pod), uid)
            for port, boot in zip(ports, boots, strict=True)]


def desired_workers(pods: Iterable[Pod], config: DiscoveryConfig) -> dict[str, DesiredWorker]:
    """URL -> worker for every eligible pod; the first pod claiming a URL keeps it (smg)."""
    desired: dict[str, DesiredWorker] = {}
    for pod in pods:
        for worker in pod_workers(pod, config):
            desired.setdefault(worker.url, worker)
    return desired


def why_gone(pod: Pod | None, config: DiscoveryConfig) -> str:
    """Why a pod's worker left the desired set, for the removal log line."""
    if pod is None:
        # A selector-filtered watch reports a pod relabelled out of the selector as deleted.
        return "pod deleted or relabelled out of the selector"
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return "pod terminating"
    if pod_role(pod, config) is None:
        return "pod no longer matches the selector"
    if not is_ready(pod):
        return "pod not ready"
    return "pod changed (IP, ports, role, bootstrap port or uid)"


# The registry side, as coroutines so tests can run the reconciler without a gateway.
AddWorker = Callable[[DesiredWorker], Awaitable[list[str]]]  # -> registered worker ids
RemoveWorker = Callable[[str], None]  # by worker id (its DP ranks too)
HasWorker = Callable[[str], bool]


class PodDiscovery:
    """The pod cache and reconciler (event loop) plus the list/watch thread.

    `api` is a `kubernetes.client.CoreV1Api`; it is only used from the thread."""

    def __init__(self, config: DiscoveryConfig, api: Any, add: AddWorker,
                 remove: RemoveWorker, has: HasWorker) -> None:
        self.config = config
        self._api = api
        self._add = add
        self._remove = remove
        self._has = has
        self._pods: dict[str, Pod] = {}
        self._owned: dict[str, tuple[DesiredWorker, list[str]]] = {}  # URL -> (worker, ids)
        self._conflicts: set[str] = set()  # URLs registered by someone else: warned once
        self._dirty = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: Any = None  # the kubernetes Watch in progress, to stop it from the loop

    # --- event loop side ---------------------------------------------------------------
    async def run(self) -> None:
        """Start the list/watch thread and reconcile until cancelled; stops the thread then."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._list_and_watch, name="k8s-discovery",
                                        daemon=True)
        self._thread.start()
        try:
            while True:
                await self._dirty.wait()
                self._dirty.clear()
                try:
                    await self.reconcile()
                except Exception:  # a bug here must not end discovery for good
                    log.exception("discovery: reconcile failed")
        finally:
            self.stop()

    def stop(self) -> None:
        self._stopping.set()
        watch = self._watch
        if watch is not None:
            watch.stop()  # shuts the socket down: the thread's blocking read returns

    def _on_list(self, pods: list[Pod]) -> None:
        self._pods = {pod_key(p): p for p in pods}
        self._dirty.set()

    def _on_event(self, kind: str, pod: Pod) -> None:
        key = pod_key(pod)
        if kind == "DELETED":
            self._pods.pop(key, None)
        else:
            self._pods[key] = pod
        self._dirty.set()

    async def reconcile(self) -> None:
        """Diff eligible workers against the ones discovery registered; add and remove the gap.
        Failed additions are retried on the next change or resync."""
        desired = desired_workers(self._pods.values(), self.config)
        for url, (worker, ids) in list(self._owned.items()):
            if not any(self._has(wid) for wid in ids):
                # Removed behind discovery's back (DELETE /workers): forget it, so a pod
                # that is still eligible brings it back, as smg's reconciler does.
                del self._owned[url]
                continue
            if desired.get(url) == worker:
                continue
            del self._owned[url]
            log.info("discovery: removing %s worker %s (pod %s: %s)", worker.role, url,
                     worker.pod, why_gone(self._pods.get(worker.pod), self.config))
            with contextlib.suppress(NotFoundError):
                self._remove(url)
        for url, worker in desired.items():
            if url in self._owned:
                continue
            try:
                ids = await self._add(worker)
            except ConflictError:
                if url not in self._conflicts:
                    self._conflicts.add(url)
                    log.warning("discovery: pod %s: worker %s is already registered (command "
                                "line or POST /workers); leaving it as it is", worker.pod, url)
                continue
            except GatewayError as exc:
                log.warning("discovery: pod %s: cannot add worker %s: %s", worker.pod, url,
                            exc.message)
                continue
            self._conflicts.discard(url)
            self._owned[url] = (worker, ids)
            boot = f", bootstrap port {worker.bootstrap_port}" \
                if worker.bootstrap_port is not None else ""
            log.info("discovery: added %s worker %s (pod %s%s); in rotation once its health "
                     "check passes", worker.role, url, worker.pod, boot)

    # --- thread side -------------------------------------------------------------------
    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop closed under us: shutting down
            self._stopping.set()

    def _list_and_watch(self) -> None:
        from kubernetes.client.exceptions import ApiException

        backoff = 1.0
        while not self._stopping.is_set():
            try:
                resource_version = self._list()
                backoff = 1.0
                started = time.monotonic()
                self._watch_pods(resource_version)
                if time.monotonic() - started < 1.0:
                    # A watch closed at once, again and again (a proxy cutting streams),
                    # must not turn into a tight list loop against the API server.
                    self._stopping.wait(1.0)
            except ApiException as exc:
                if self._stopping.is_set():
                    break
                if exc.status == HTTP_GONE:
                    # The resource version was compacted away: only a fresh list can resume.
                    log.info("discovery: watch expired (410 Gone); re-listing pods")
                    continue
                log.warning("discovery: Kubernetes API error %s %s; re-listing in %.0f s",
                            exc.status, exc.reason, backoff)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECS)
            except Exception as exc:  # connection refused, reset, timeouts: retry with backoff
                if self._stopping.is_set():
                    break
                log.warning("discovery: Kubernetes API unreachable (%s: %s); re-listing in "
                            "%.0f s", type(exc).__name__, exc, backoff)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECS)
        with contextlib.suppress(Exception):
            self._api.api_client.close()

    def _list_call(self) -> Callable[..., Any]:
        if self.config.namespace is None:
            return self._api.list_pod_for_all_namespaces  # type: ignore[no-any-return]
        namespace = self.config.namespace
        return lambda **kw: self._api.list_namespaced_pod(namespace, **kw)

    def _list(self) -> str:
        """List the pods, hand them to the loop; returns the list's resource version."""
        response = self._list_call()(
            label_selector=self.config.list_label_selector(), _preload_content=False,
            _request_timeout=(CONNECT_TIMEOUT_SECS, LIST_READ_TIMEOUT_SECS))
        try:
            body = orjson.loads(response.data)
        finally:
            response.release_conn()
        items = body.get("items") or []
        self._post(self._on_list, items)
        return str((body.get("metadata") or {}).get("resourceVersion") or "")

    def _watch_pods(self, resource_version: str) -> None:
        """Stream watch events from `resource_version` until the resync deadline or the end of
        the stream (both: the caller re-lists). ApiException 410 when the version expired."""
        from kubernetes import watch
        from urllib3.exceptions import ReadTimeoutError

        resync = self.config.resync_secs
        deadline = time.monotonic() + resync
        # The list function is passed under its own name: Watch reads its docstring to find
        # the return type of the events.
        func = (self._api.list_pod_for_all_namespaces if self.config.namespace is None
                else self._api.list_namespaced_pod)
        args = () if self.config.namespace is None else (self.config.namespace,)
        # The kubernetes package is untyped: its objects are handled as Any here.
        self._watch = w = cast(Any, watch.Watch)()
        if self._stopping.is_set():  # stop() ran before this watch could be stopped
            self._watch = None
            return
        try:
            for event in w.stream(
                    func, *args, label_selector=self.config.list_label_selector(),
                    resource_version=resource_version, allow_watch_bookmarks=True,
                    # A server-side timeout disables Watch's own silent 410 retry, so an
                    # expired version reaches the loop above and is followed by a re-list.
                    timeout_seconds=max(1, int(resync)),
                    _request_timeout=(CONNECT_TIMEOUT_SECS, resync + WATCH_READ_SLACK_SECS)):
                if self._stopping.is_set():
                    break
                if isinstance(event, dict) and event.get("type") in (
                        "ADDED", "MODIFIED", "DELETED"):
                    raw = event.get("raw_object")
                    if isinstance(raw, dict):
                        self._post(self._on_event, event["type"], raw)
                if time.monotonic() >= deadline:
                    break
        except ReadTimeoutError:
            pass  # a quiet watch past its deadline: re-list
        finally:
            self._watch = None
            w.stop()


def load_kube_configuration() -> Any:
    """The API server and credentials: the pod's service account in a cluster, else the
    kubeconfig ($KUBECONFIG or ~/.kube/config), as kubectl finds them."""
    from kubernetes import client, config

    configuration = client.Configuration()
    in_cluster: Any = config.load_incluster_config
    kubeconfig: Any = config.load_kube_config
    try:
        in_cluster(client_configuration=configuration)
    except config.ConfigException:
        try:
            # $KUBECONFIG read now: the package reads it once, when it is first imported.
            kubeconfig(config_file=os.environ.get("KUBECONFIG"),
                       client_configuration=configuration)
        except (config.ConfigException, OSError) as exc:
            raise ConfigError(f"service_discovery: no Kubernetes API configuration (not in a "
                              f"cluster, and no usable kubeconfig): {exc}") from None
    return configuration


async def start_discovery(state: GatewayState) -> PodDiscovery:
    """Start discovery for a gateway (`GatewayState`): its task joins `state.tasks`, whose
    cancellation at shutdown also stops the list/watch thread."""
    from kubernetes import client

    from gateway import admin

    config = DiscoveryConfig.from_settings(state.settings)
    configuration = await asyncio.to_thread(load_kube_configuration)
    api = client.CoreV1Api(client.ApiClient(configuration))

    async def add(worker: DesiredWorker) -> list[str]:
        added = await admin.register_worker(state, worker.url, worker.role,
                                            worker.bootstrap_port)
        return [w.worker_id for w in added]

    def remove(worker_id: str) -> None:
        admin.unregister_worker(state, worker_id)

    discovery = PodDiscovery(config, api, add, remove,
                             lambda wid: state.workers.find(wid) is not None)
    scope = f"namespace {config.namespace}" if config.namespace else "all namespaces"
    log.info("discovery: watching pods in %s, %s (API filter %r, port %d, resync every %.0f s)",
             scope, ", ".join(f"{role}: {','.join(f'{k}={v}' for k, v in sel.items())}"
                              for role, sel in config.role_selectors()),
             config.list_label_selector(), config.port, config.resync_secs)
    state.tasks.append(asyncio.ensure_future(discovery.run()))
    return discovery
