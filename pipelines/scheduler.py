"""The build's scheduler: a pure object that turns a plan and each arrival into the next calls and settled
artifacts. It knows nothing of Ray (the driver in `pipelines.build` is a thin loop around it), so its
guarantees are tested directly (`tests/pipelines/test_scheduler.py`, hypothesis):

- every todo artifact settles exactly once, ok or failed with a typed `Reason`;
- a todo step whose input failed (in this build, or before it and not retried) fails once with
  `upstream_failed`, naming the input and its reason;
- a call is dispatched only once its inputs exist, at most `capacity[worker]` calls run per worker pool, at
  most `max_in_flight` assets are between their first call and their last settled artifact, and a call that
  reads another call's node-local (transient) output is pinned to that node;
- nothing waits forever: while work remains, some call is in flight or ready.

An asset's calls follow from its todo steps: each step's own call, except that a call also makes the todo
steps it lists in `also` when it can (the `lh` encode call makes the latents in the same go); and a call whose
transient output a todo step reads runs even when its own steps are done (the `lh` images are not kept).
"""

import collections
import dataclasses
import itertools
from collections.abc import Iterable, Mapping
from typing import Any

from infra.errors import Reason

STORED = "stored"
"""`Dispatch.inputs` value of an input committed before this build: the driver reads it from the catalog."""


@dataclasses.dataclass(frozen=True)
class StepNode:
    name: str
    inputs: tuple[str, ...]
    """Upstream steps (not the source or drawn content)."""
    call: str
    transient_inputs: tuple[str, ...] = ()
    """Inputs read from their call's node-local output of this build rather than from their pack."""


@dataclasses.dataclass(frozen=True)
class CallNode:
    name: str
    worker: str
    """The worker pool that runs it (`render`, `encoder`)."""
    also: tuple[str, ...] = ()
    """Steps of other calls it also makes when they are todo with it and their inputs are then at hand."""
    transient: bool = False
    """Leaves node-local output (an `lh` render set) that calls on the same node read."""


@dataclasses.dataclass(frozen=True)
class Topology:
    steps: Mapping[str, StepNode]
    """In dependency order."""
    calls: Mapping[str, CallNode]

    def __post_init__(self) -> None:
        for step in self.steps.values():
            if step.call not in self.calls:
                raise ValueError(f"step {step.name!r} names unknown call {step.call!r}")
            unknown = set(step.inputs) - set(self.steps)
            if unknown or not set(step.transient_inputs) <= set(step.inputs):
                raise ValueError(f"step {step.name!r}: inputs {sorted(unknown)} unknown, or transient inputs "
                                 f"{step.transient_inputs} not among its inputs")
            for name in step.transient_inputs:
                if not self.calls[self.steps[name].call].transient:
                    raise ValueError(f"step {step.name!r} reads {name!r} as transient, but its call leaves none")

    def yields(self, call: str) -> tuple[str, ...]:
        return tuple(s.name for s in self.steps.values() if s.call == call)


@dataclasses.dataclass(frozen=True)
class Failure:
    """A todo artifact that failed without a worker's record of it (an input failed, a worker was lost)."""

    reason: Reason
    message: str
    ok = False


@dataclasses.dataclass(frozen=True)
class Dispatch:
    """One call to make: on `asset`, the `keys` (step -> artifact key) to produce."""

    call_id: int
    asset: str
    call: str
    worker: str
    keys: Mapping[str, str]
    inputs: Mapping[str, Any]
    """Input step -> the payload its call returned in this build, or STORED."""
    transient: Any = None
    """The node-local output this call reads (as its producing call returned it)."""
    node: str | None = None
    """The node the call must run on (where `transient` lies); None: anywhere."""


@dataclasses.dataclass(frozen=True)
class Settled:
    """A todo artifact's end: `outcome` is the worker's payload (its `.ok` says which) or a `Failure`."""

    asset: str
    step: str
    key: str
    outcome: Any


@dataclasses.dataclass(frozen=True)
class Discard:
    """A transient output no step of this build reads any more (the driver deletes it on its node)."""

    asset: str
    call_id: int
    transient: Any
    node: str | None


@dataclasses.dataclass
class _Asset:
    todo: dict[str, str]
    stored: frozenset[str]
    outputs: dict[str, Any] = dataclasses.field(default_factory=dict)
    failures: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Step -> why it is unavailable (settled failed in this build)."""
    dispatched: set[str] = dataclasses.field(default_factory=set)
    transients: dict[str, tuple[int, Any, str | None]] = dataclasses.field(default_factory=dict)
    """Call -> (call id, transient payload, node) of its node-local output in this build."""
    transient_failures: dict[str, Any] = dataclasses.field(default_factory=dict)
    transient_calls: set[str] = dataclasses.field(default_factory=set)
    """Transient calls dispatched in this build."""
    in_flight: set[int] = dataclasses.field(default_factory=set)
    superseded: list[tuple[int, Any, str | None]] = dataclasses.field(default_factory=list)
    """Transient outputs of a call that ran again for the asset: discarded with the rest."""

    def settled(self, step: str) -> bool:
        return step in self.outputs or step in self.failures

    @property
    def done(self) -> bool:
        return not self.in_flight and all(self.settled(s) for s in self.todo)


class Scheduler:
    """Plan in, calls and settled artifacts out.

    Args:
        topology: the steps and calls (`pipelines.steps.StepTable.topology`).
        work: asset -> {todo step: artifact key}.
        stored: asset -> the steps with an `ok` artifact committed before this build (the others that are not
            todo failed before, and are unavailable as inputs).
        max_in_flight: assets between their first call and their last settled artifact.
        capacity: worker pool -> calls it runs at once (a pool not named is unbounded: its actors queue).
    """

    def __init__(self, topology: Topology, work: Mapping[str, Mapping[str, str]],
                 stored: Mapping[str, Iterable[str]], *, max_in_flight: int, capacity: Mapping[str, int]) -> None:
        if max_in_flight < 1 or any(c < 1 for c in capacity.values()):
            raise ValueError(f"max_in_flight and capacities must be >= 1, got {max_in_flight}, {dict(capacity)}")
        for asset, steps in work.items():
            unknown = set(steps) - set(topology.steps)
            if unknown:
                raise ValueError(f"{asset}: unknown steps {sorted(unknown)}")
        self.topology, self.max_in_flight, self.capacity = topology, max_in_flight, dict(capacity)
        self._waiting = collections.deque(sorted(asset for asset, steps in work.items() if steps))
        self._work, self._stored = work, stored
        self._active: dict[str, _Asset] = {}
        self._running: collections.Counter = collections.Counter()  # worker -> calls in flight
        self._calls: dict[int, Dispatch] = {}
        self._ids = itertools.count()
        self._settled: list[Settled] = []
        self._discards: list[Discard] = []
        self._order = list(topology.steps)

    @property
    def finished(self) -> bool:
        return not self._waiting and not self._active

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    def dispatch(self) -> list[Dispatch]:
        """Start assets up to `max_in_flight` and return every call that can run now."""
        calls: list[Dispatch] = []
        while True:  # assets that settle without a call (every step upstream_failed) make room for the next
            while self._waiting and len(self._active) < self.max_in_flight:
                asset = self._waiting.popleft()
                self._active[asset] = _Asset(dict(self._work[asset]), frozenset(self._stored.get(asset, ())))
            for asset in list(self._active):
                calls += self._advance(asset)
            if calls or self._calls or not self._waiting or len(self._active) >= self.max_in_flight:
                break
        if not calls and not self._calls and not self.finished:
            raise RuntimeError(f"scheduler stalled with {len(self._active)} assets active and no call in flight")
        return calls

    def arrived(self, call_id: int, outcomes: Mapping[str, Any], *, transient: Any = None,
                node: str | None = None, failure: Failure | None = None) -> None:
        """A call returned: `outcomes` has a payload (with `.ok`) per key of its dispatch; `transient` is its
        node-local output (None if it left none: a failed render, whose reason `failure` gives), on `node`."""
        call = self._finish(call_id)
        state = self._active[call.asset]
        for step in call.keys:
            outcome = outcomes.get(step)
            if outcome is None:
                outcome = Failure(Reason.INVALID_OUTPUT, f"call {call.call} returned no result for {step}")
            self._settle(call.asset, step, outcome)
        if self.topology.calls[call.call].transient:
            if transient is not None:
                if call.call in state.transients:  # the call ran twice: its first output goes too
                    state.superseded.append(state.transients[call.call])
                state.transients[call.call] = (call_id, transient, node)
            else:
                failed = [o for o in outcomes.values() if not o.ok]
                state.transient_failures[call.call] = failure or (failed[0] if failed else Failure(
                    Reason.INVALID_OUTPUT, f"call {call.call} left no output"))
        self._close_if_done(call.asset)

    def lost(self, call_id: int, message: str) -> None:
        """A call's worker died: its todo artifacts fail with `worker_crashed` (a later build may retry them)."""
        call = self._finish(call_id)
        failure = Failure(Reason.WORKER_CRASHED, message)
        for step in call.keys:
            self._settle(call.asset, step, failure)
        if self.topology.calls[call.call].transient:
            self._active[call.asset].transient_failures[call.call] = failure
        self._close_if_done(call.asset)

    def take_settled(self) -> list[Settled]:
        settled, self._settled = self._settled, []
        return settled

    def take_discards(self) -> list[Discard]:
        discards, self._discards = self._discards, []
        return discards

    # -- internals ----------------------------------------------------------------------------------------------

    def _finish(self, call_id: int) -> Dispatch:
        if call_id not in self._calls:
            raise KeyError(f"call {call_id} is not in flight")
        call = self._calls.pop(call_id)
        self._running[call.worker] -= 1
        self._active[call.asset].in_flight.discard(call_id)
        return call

    def _settle(self, asset: str, step: str, outcome: Any) -> None:
        state = self._active[asset]
        if state.settled(step):
            raise RuntimeError(f"{asset}/{step} settled twice")
        if outcome.ok:
            state.outputs[step] = outcome
        else:
            state.failures[step] = outcome
        self._settled.append(Settled(asset, step, state.todo[step], outcome))

    def _close_if_done(self, asset: str) -> None:
        state = self._active[asset]
        if state.done:
            for call_id, transient, node in [*state.superseded, *state.transients.values()]:
                self._discards.append(Discard(asset, call_id, transient, node))
            del self._active[asset]

    def _input_state(self, state: _Asset, step: str, name: str) -> tuple[str, Any]:
        """('ok', payload or STORED) | ('pending', None) | ('failed', why) of input `name` of `step`."""
        if name in self.topology.steps[step].transient_inputs:
            status, why = self._input_state(state, name, name)  # the step itself must be ok (or made) first
            if status != "ok":
                return status, why
            call = self.topology.steps[name].call
            if call in state.transients:
                return "ok", state.transients[call]
            if call in state.transient_failures:
                return "failed", state.transient_failures[call]
            upstream = [i for i in self.topology.steps[name].inputs if self._input_state(state, name, i)[0] == "failed"]
            if upstream:
                return "failed", Failure(Reason.UPSTREAM_FAILED, f"{name} cannot be made")
            return "pending", None
        if name in state.outputs:
            return "ok", state.outputs[name]
        if name in state.failures:
            return "failed", state.failures[name]
        if name in state.todo:
            return "pending", None
        if name in state.stored:
            return "ok", STORED
        return "failed", Failure(Reason.UPSTREAM_FAILED, f"no ok {name} artifact (it failed in an earlier build)")

    def _advance(self, asset: str) -> list[Dispatch]:
        state = self._active[asset]
        calls: list[Dispatch] = []
        changed = True
        while changed:
            changed = False
            for step in self._order:  # fail what can no longer be made
                if step not in state.todo or step in state.dispatched or state.settled(step):
                    continue
                for name in self.topology.steps[step].inputs:
                    status, why = self._input_state(state, step, name)
                    if status == "failed":
                        self._settle(asset, step, Failure(Reason.UPSTREAM_FAILED, f"{name} failed: {_describe(why)}"))
                        changed = True
                        break
            for call in self.topology.calls.values():
                dispatch = self._ready(asset, state, call)
                if dispatch is not None:
                    calls.append(dispatch)
                    changed = True
        self._close_if_done(asset)
        return calls

    def _ready(self, asset: str, state: _Asset, call: CallNode) -> Dispatch | None:
        """The call to make now for `call` on this asset, if any is needed and ready and its pool has room."""
        if self._running[call.worker] >= self.capacity.get(call.worker, float("inf")):
            return None
        open_steps = [s for s in self._order if s in state.todo and s not in state.dispatched and not state.settled(s)]
        mine = [s for s in open_steps if self.topology.steps[s].call == call.name]
        needs_transient = call.transient and call.name not in state.transient_calls and any(
            self._reads_ready(state, s, call.name) for s in open_steps)
        inputs: dict[str, Any] = {}
        transient = node = None
        keys: list[str] = []
        for step in mine:
            found = self._inputs_of(state, step, making=set(keys))
            if found is None:
                continue
            keys.append(step)
            inputs.update(found[0])
            transient, node = found[1] or (transient, node)
        if not keys and not needs_transient:
            return None
        for step in call.also:  # downstream steps this call makes in the same go
            if step in open_steps and step not in keys:
                found = self._inputs_of(state, step, making=set(keys))
                if found is not None:
                    keys.append(step)
                    inputs.update(found[0])
                    transient, node = found[1] or (transient, node)
        inputs = {name: value for name, value in inputs.items() if name not in keys}
        dispatch = Dispatch(next(self._ids), asset, call.name, call.worker, {s: state.todo[s] for s in keys},
                            inputs, transient, node)
        self._calls[dispatch.call_id] = dispatch
        self._running[call.worker] += 1
        state.in_flight.add(dispatch.call_id)
        state.dispatched.update(keys)
        if call.transient:
            state.transient_calls.add(call.name)
        return dispatch

    def _reads_ready(self, state: _Asset, step: str, call: str) -> bool:
        """Whether `step` reads `call`'s transient output and every step it reads from it is ok already."""
        reads = [i for i in self.topology.steps[step].transient_inputs if self.topology.steps[i].call == call]
        return bool(reads) and all(i in state.outputs or i in state.stored for i in reads)

    def _inputs_of(self, state: _Asset, step: str, making: set[str]) -> tuple[dict[str, Any], tuple | None] | None:
        """(input step -> payload, (transient, node) or None) when every input of `step` is at hand or made by
        the same call, else None."""
        inputs: dict[str, Any] = {}
        transient = None
        for name in self.topology.steps[step].inputs:
            if name in making:
                continue
            status, value = self._input_state(state, step, name)
            if status != "ok":
                return None
            if name in self.topology.steps[step].transient_inputs:
                transient = (value[1], value[2])
            else:
                inputs[name] = value
        return inputs, transient


def _describe(why: Any) -> str:
    reason = getattr(why, "reason", None)
    reason = getattr(reason, "value", reason)
    message = getattr(why, "message", "")
    return f"{reason}: {message}" if reason else str(message)
