"""docker-compose stack: parses, interpolates, and its services reference each other correctly
(gateway -> prefill/decode URLs and bootstrap port, Prometheus -> scrape targets, Grafana ->
datasource and dashboards). `docker compose config` is not available here, so the checks are
done on the parsed document."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.conftest import DEPLOY, REPO, load_yaml_docs

COMPOSE_DIR = DEPLOY / "compose"
COMPOSE = COMPOSE_DIR / "docker-compose.yml"
PROM_CONFIG = COMPOSE_DIR / "prometheus" / "prometheus.yml"
COMPOSE_SCHEMA = Path(__file__).parent / "schemas" / "compose_spec.json"

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose-spec variable interpolation for ${VAR}, ${VAR:-default}, ${VAR:?error}."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        if name in env and (env[name] or op is None or not op.startswith(":")):
            return env[name]
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            raise KeyError(f"{name}: {arg}")
        return ""

    return _VAR.sub(sub, value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    docs = load_yaml_docs(COMPOSE)
    assert len(docs) == 1
    return interpolate(docs[0], {"GATEWAY_ADMIN_TOKEN": "test-token"})


def _flag(cmd: list[str], flag: str) -> str:
    assert flag in cmd, f"{flag} missing from {cmd[:4]}..."
    return cmd[cmd.index(flag) + 1]


def test_required_variable_is_enforced() -> None:
    raw = load_yaml_docs(COMPOSE)[0]
    with pytest.raises(KeyError, match="GATEWAY_ADMIN_TOKEN"):
        interpolate(raw, {})


def test_calibration_mode_runs_without_a_zone_table() -> None:
    raw = load_yaml_docs(COMPOSE)[0]
    env = interpolate(raw, {"GATEWAY_ADMIN_TOKEN": "t", "ELDR_DECODE_POLICY": "least_load",
                            "ELDR_ZONES": ""})["services"]["gateway"]["environment"]
    assert env["GATEWAY_ZONES"] == ""
    assert env["GATEWAY_DECODE_POLICY"] == "least_load"
    # ... and the gateway's own environment parser reads an empty GATEWAY_ZONES as "no table".
    cli = pytest.importorskip("gateway.cli", reason="pending: gateway.cli not written yet")
    settings = cli.settings_from_args(
        ["--pd-disaggregation", "--prefill", "http://prefill:30000", "8998",
         "--decode", "http://decode:30000"],
        env={k: str(v) for k, v in env.items()},
    )
    assert settings.zones is None
    assert settings.effective_decode_policy == "least_load"


def test_matches_the_compose_specification_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    import json

    doc = load_yaml_docs(COMPOSE)[0]
    # The vendored schema predates the top-level `name` (see schemas/README.md).
    assert isinstance(doc.pop("name"), str)
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=str)
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_services_present(compose: dict[str, Any]) -> None:
    assert {"prefill", "decode", "gateway", "prometheus", "grafana"} <= set(compose["services"])


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_sglang_workers(compose: dict[str, Any], role: str) -> None:
    svc = compose["services"][role]
    assert svc["image"].startswith("lmsysorg/sglang")
    cmd = svc["command"]
    assert cmd[:3] == ["python3", "-m", "sglang.launch_server"]
    assert _flag(cmd, "--disaggregation-mode") == role
    assert "--enable-return-routed-experts" in cmd
    assert "--enable-metrics" in cmd
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in devices)


def test_workers_use_different_gpus(compose: dict[str, Any]) -> None:
    ids = [
        tuple(d["device_ids"])
        for role in ("prefill", "decode")
        for d in compose["services"][role]["deploy"]["resources"]["reservations"]["devices"]
    ]
    assert len(set(ids)) == len(ids)


def test_gateway_points_at_the_workers(compose: dict[str, Any]) -> None:
    services = compose["services"]
    gw = services["gateway"]["command"]
    prefill_cmd = services["prefill"]["command"]
    decode_cmd = services["decode"]["command"]
    i = gw.index("--prefill")
    prefill_url, bootstrap = gw[i + 1], gw[i + 2]
    assert prefill_url == f"http://prefill:{_flag(prefill_cmd, '--port')}"
    # The bootstrap port the gateway injects must be the one the prefill listens on.
    assert bootstrap == _flag(prefill_cmd, "--disaggregation-bootstrap-port")
    assert _flag(gw, "--decode") == f"http://decode:{_flag(decode_cmd, '--port')}"
    assert "--pd-disaggregation" in gw
    assert set(services["gateway"]["depends_on"]) >= {"prefill", "decode"}
    # The same transfer backend on both sides, or the KV handshake fails.
    assert _flag(prefill_cmd, "--disaggregation-transfer-backend") == _flag(
        decode_cmd, "--disaggregation-transfer-backend"
    )


def test_gateway_ports_and_zone_mount(compose: dict[str, Any]) -> None:
    gw = compose["services"]["gateway"]
    cmd = gw["command"]
    published = {p.split(":")[-1] for p in gw["ports"]}
    assert {_flag(cmd, "--port"), _flag(cmd, "--prometheus-port")} <= published
    zones = Path(gw["environment"]["GATEWAY_ZONES"])
    assert gw["environment"]["GATEWAY_DECODE_POLICY"] == "eldr"
    mounts = {m.split(":")[1]: m.split(":")[0] for m in gw["volumes"]}
    assert str(zones.parent) in mounts, "zone table directory must be mounted (hot reload)"
    assert (COMPOSE_DIR / mounts[str(zones.parent)]).is_dir()
    assert gw["environment"]["GATEWAY_ADMIN_TOKEN"] == "test-token"
    build = gw["build"]
    assert (COMPOSE_DIR / build["context"] / build["dockerfile"]).resolve() == REPO / "Dockerfile"


def test_relative_bind_mounts_exist(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (COMPOSE_DIR / src).exists(), f"{name}: bind source {src} missing"


def test_prometheus_scrapes_what_the_services_serve(compose: dict[str, Any]) -> None:
    services = compose["services"]
    prom = load_yaml_docs(PROM_CONFIG)[0]
    listen = {
        "gateway": {_flag(services["gateway"]["command"], "--prometheus-port")},
        "prefill": {_flag(services["prefill"]["command"], "--port")},
        "decode": {_flag(services["decode"]["command"], "--port")},
    }
    targets = [
        t
        for job in prom["scrape_configs"]
        for sc in job["static_configs"]
        for t in sc["targets"]
    ]
    assert {t.split(":")[0] for t in targets} == set(listen)
    for t in targets:
        host, port = t.split(":")
        assert port in listen[host], f"{t}: {host} does not listen on {port}"
    mounted = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"]}
    assert (COMPOSE_DIR / mounted["/etc/prometheus/prometheus.yml"]).resolve() == PROM_CONFIG


def test_grafana_provisioning_is_consistent(compose: dict[str, Any]) -> None:
    graf = compose["services"]["grafana"]
    mounts = {v.split(":")[1]: COMPOSE_DIR / v.split(":")[0] for v in graf["volumes"]
              if v.startswith(".")}
    prov = mounts["/etc/grafana/provisioning"]
    ds = load_yaml_docs(prov / "datasources" / "prometheus.yml")[0]["datasources"][0]
    assert ds["url"] == "http://prometheus:9090"
    provider = load_yaml_docs(prov / "dashboards" / "eldr.yml")[0]["providers"][0]
    dash_dir = mounts[provider["options"]["path"]]
    dashboards = list(dash_dir.glob("*.json"))
    assert dashboards
    import json

    for path in dashboards:
        uids = {
            t["datasource"]["uid"]
            for p in json.loads(path.read_text())["panels"]
            for t in p.get("targets", [])
        }
        assert uids == {ds["uid"]}, f"{path.name} uses datasource uids {uids}"


def test_promtool_accepts_the_prometheus_config() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`; .ci/run installs it)")
    r = subprocess.run([promtool, "check", "config", str(PROM_CONFIG)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_gateway_accepts_the_compose_command_line(compose: dict[str, Any]) -> None:
    cli = pytest.importorskip("gateway.cli", reason="pending: gateway.cli not written yet")
    import dataclasses

    from gateway.config import Settings

    gw = compose["services"]["gateway"]
    known = {"GATEWAY_" + f.name.upper() for f in dataclasses.fields(Settings)}
    assert set(gw["environment"]) <= known, set(gw["environment"]) - known
    settings = cli.settings_from_args(gw["command"], env=gw["environment"])
    assert settings.pd_disaggregation
    assert settings.admin_token == "test-token"
    assert settings.zones == "/etc/eldr/zones/zones.json"
