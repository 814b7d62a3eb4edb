"""The gateway's exception tree.

Upstream transport problems become these domain errors in exactly one place (`upstream.py`), and
these become HTTP responses in exactly one place (`app.py`'s error middleware):

    GatewayError                      -> 500 unless a subclass says otherwise
    ├── BadRequestError               -> 400  malformed client input; message names the field
    │   └── PayloadTooLargeError      -> 413
    ├── UnauthorizedError             -> 401  admin bearer token missing or wrong
    ├── NotFoundError                 -> 404  unknown worker id
    ├── ConflictError                 -> 409  worker already registered
    ├── OverloadedError               -> 429  rate-limit queue full / queue timeout
    └── NoWorkersError                -> 503  no available worker for a role

Upstream failures are not exceptions of this tree: `upstream.AttemptFailed` carries the failed
attempt (worker, kind, status) to the retry loop, which answers 502/504 or the worker's own error.
"""

from __future__ import annotations


class GatewayError(Exception):
    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param  # the request field at fault, when there is one


class BadRequestError(GatewayError):
    status = 400
    code = "invalid_request"


class PayloadTooLargeError(BadRequestError):
    status = 413
    code = "payload_too_large"


class UnauthorizedError(GatewayError):
    status = 401
    code = "unauthorized"


class NotFoundError(GatewayError):
    status = 404
    code = "not_found"


class ConflictError(GatewayError):
    status = 409
    code = "conflict"


class OverloadedError(GatewayError):
    """The concurrency queue is full (smg 1.13: 429 `admission_queue_full`)."""

    status = 429
    code = "admission_queue_full"
    reason = "queue_full"  # metrics label


class QueueTimeoutError(OverloadedError):
    """A request waited `--queue-timeout-secs` for a slot (smg 1.13: 503
    `admission_queue_timeout`; sglang-router 0.3.2 answered 408)."""

    status = 503
    code = "admission_queue_timeout"
    reason = "queue_timeout"


class NoWorkersError(GatewayError):
    status = 503
    code = "no_available_workers"


class ConfigError(ValueError):
    """A setting is invalid; raised at start-up, the message names the setting."""
