"""Expert locality for one app: everything `--zones` (or `--calibration-log` alone) switches on,
built from `Settings`.

`start_locality` loads the zone table (failing start-up when it cannot), and builds the metrics,
the signature resolver and, with `--calibration-log`, the calibration hook; `Locality.policy`
builds the `eldr` decode policy. The app owns the result (`GatewayState.locality`): it starts
`runtime.watch()` as a background task and closes the hook on shutdown.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from gateway.config import Settings
from gateway.eldr.calibration_hook import CalibrationHook
from gateway.eldr.calibration_log import CalibrationSampler, CalibrationWriter
from gateway.eldr.metrics import EldrMetrics
from gateway.eldr.policy import EldrPolicy
from gateway.eldr.resolver import LocalityResolver, ResolverSettings, SignatureResolver
from gateway.eldr.runtime import ZoneRuntime
from gateway.eldr.step_cost import StepCostModel
from gateway.errors import GatewayError
from gateway.routing import Policy


@dataclass(frozen=True)
class Locality:
    runtime: ZoneRuntime
    metrics: EldrMetrics
    resolver: LocalityResolver
    hook: CalibrationHook | None  # the calibration log, when configured

    def policy(self, settings: Settings, fallback: Policy) -> EldrPolicy:
        """The `eldr` decode policy: band overrides from settings, fallbacks counted."""
        return EldrPolicy(tau=settings.eldr_tau, min_candidates=settings.eldr_min_candidates,
                          load_bound=settings.eldr_load_bound, decision=settings.eldr_decision,
                          step_cost=StepCostModel.from_settings(settings), fallback=fallback,
                          on_fallback=self.metrics.record_fallback)


async def start_locality(settings: Settings, registry: CollectorRegistry) -> Locality:
    """Load the zone table and build locality's parts; GatewayError when the table cannot load
    (at start-up a bad table is fatal; later reloads keep the old one serving).

    Without `--zones` (only `--calibration-log` with `--model-geometry`) no table is loaded:
    the resolver finds no signatures and only the calibration hook works.
    """
    assert settings.zones or settings.calibration_log, "start_locality needs zones or a log"
    metrics = EldrMetrics(registry)
    runtime = ZoneRuntime(settings.zones, metrics=metrics, geometry=settings.geometry)
    if settings.zones:
        result = await runtime.reload()
        if runtime.active is None:
            raise GatewayError(f"zones: cannot load {settings.zones}: "
                               f"{runtime.last_error or result}")
    resolver = LocalityResolver(SignatureResolver(
        runtime, ResolverSettings.from_settings(settings), metrics=metrics))
    hook = None
    if settings.calibration_log:
        writer = CalibrationWriter(settings.calibration_log, metrics=metrics)
        writer.start()
        hook = CalibrationHook(writer, CalibrationSampler(settings.calibration_sample_rate),
                               runtime)
    return Locality(runtime, metrics, resolver, hook)
