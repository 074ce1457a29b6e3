"""The requests a cluster serves: by the client's request id, and by the worker-level id of each
request's current attempt (what workers name in their outputs and handoff events)."""

from __future__ import annotations

from collections.abc import Iterator

from batonserve.cluster.request_state import Attempt, RequestState


class RequestTable:
    """Owns the in-flight requests; an output of an abandoned attempt finds nothing here."""

    def __init__(self) -> None:
        self._by_id: dict[str, RequestState] = {}
        self._by_attempt: dict[str, RequestState] = {}

    def add(self, st: RequestState) -> None:
        """Register a new request (the caller checked that its id is free)."""
        assert st.request_id not in self._by_id, "request ids are unique while in flight"
        self._by_id[st.request_id] = st

    def remove(self, st: RequestState) -> None:
        """Forget a request that ended (a newer request under the same id stays)."""
        rid = st.request_id
        if self._by_id.get(rid) is st:
            del self._by_id[rid]

    def bind(self, st: RequestState, a: Attempt) -> None:
        """Route a new attempt's worker-level id to its request."""
        self._by_attempt[a.worker_request_id] = st

    def unbind(self, a: Attempt) -> None:
        """The attempt was abandoned or ended: nothing of it is taken any more."""
        self._by_attempt.pop(a.worker_request_id, None)

    def current(self, worker_request_id: str) -> tuple[RequestState, Attempt] | None:
        """The request and attempt a worker-level id belongs to, if that attempt is current."""
        st = self._by_attempt.get(worker_request_id)
        a = st.attempt if st is not None else None
        if st is None or a is None or a.worker_request_id != worker_request_id:
            return None
        return st, a

    def get(self, request_id: str) -> RequestState | None:
        """A request by its client id."""
        return self._by_id.get(request_id)

    def __getitem__(self, request_id: str) -> RequestState:
        return self._by_id[request_id]

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._by_id

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_id)

    def values(self) -> list[RequestState]:
        """Every request in flight (a copy: callers may end requests while iterating)."""
        return list(self._by_id.values())
