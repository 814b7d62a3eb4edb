"""Types of the C extension built from gateway/_simkernel.c (see there for the algorithm)."""

from collections.abc import Sequence
from typing import Any as Buffer  # collections.abc.Buffer is Python >= 3.12
from typing import Literal, Protocol

class _Candidate(Protocol):
    @property
    def worker_id(self) -> str: ...
    @property
    def in_flight(self) -> int: ...

class Index:
    def __init__(self, centroids: Buffer, rows: int, dim: int, isa: str = "auto") -> None: ...
    @property
    def isa(self) -> str: ...
    def candidates(
        self, signature: Buffer, tau: float, rank_depth: int
    ) -> tuple[list[float], list[int]] | Literal[False] | None: ...
    def exact(self, signature: Buffer) -> list[float]: ...
    def bounds(
        self, signature: Buffer
    ) -> tuple[list[float], list[float], list[float], list[float]] | None: ...
    @property
    def candidates_count(self) -> int: ...
    @property
    def rank_depth(self) -> int: ...
    def set_workers(
        self,
        positions: tuple[int, ...],
        zoneless: tuple[int, ...],
        candidates: int,
        ids: tuple[str, ...] | None = None,
    ) -> None: ...
    def matches(self, candidates: Sequence[_Candidate]) -> bool: ...
    def choose(
        self,
        signature: Buffer,
        in_flight: Sequence[int] | Sequence[_Candidate],
        tau: float,
        min_candidates: int,
    ) -> tuple[int, int, int, int, float] | Literal[False] | None: ...
    def choose_all(
        self,
        negated_similarities: Buffer,
        in_flight: Sequence[int] | Sequence[_Candidate],
        tau: float,
        min_candidates: int,
    ) -> tuple[int, int, int, int, float] | None: ...
