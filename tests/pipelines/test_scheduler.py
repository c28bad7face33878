"""The build's scheduler (`pipelines.scheduler`), driven without Ray: random plans, arrival orders and failure
patterns on the real build's topology and on random small DAGs, each run checked against the scheduler's
guarantees after every call (`_Checker`), plus explicit runs on the real topology.

Checked on every run:
1. every todo artifact settles exactly once (ok or failed, failures with an `infra.errors.Reason`); nothing
   else settles;
2. a todo step that is never dispatched settles `upstream_failed`, and only once one of its inputs failed (in
   this build, before it, or its transient output is gone);
3. the driver loop ends within a bound, and `dispatch()` never stalls;
4. at most `capacity[pool]` calls of a pool, and at most `max_in_flight` started, unfinished assets at a time;
5. a call's inputs exist when it is dispatched: made by the same call, settled ok earlier (`Dispatch.inputs`
   carries that payload) or stored (`STORED`);
6. a call that reads a transient input carries that transient and runs on the node its call reported;
7. each transient output that arrived is discarded exactly once, once no step still needs it;
8. a lost call fails its keys with `worker_crashed`.
"""

import collections
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from encoders.weights import WeightsInfo
from infra.errors import Reason
from pipelines.build_config import BuildConfig
from pipelines.scheduler import STORED, CallNode, Dispatch, Failure, Scheduler, StepNode, Topology
from pipelines.steps import EnvMaps, build_table


def _topology(steps: list[StepNode], calls: list[CallNode]) -> Topology:
    return Topology(steps={s.name: s for s in steps}, calls={c.name: c for c in calls})


BUILD_TOPOLOGY = _topology(
    [
        StepNode("render_lh", (), "render_lh"),
        StepNode("normalize", (), "render_lh"),
        StepNode("voxelize", ("normalize",), "voxelize"),
        StepNode("features", ("render_lh", "voxelize"), "encode", transient_inputs=("render_lh",)),
        StepNode("slat_lh", ("voxelize", "features"), "latents"),
        StepNode("slat_bc", ("voxelize", "features"), "latents"),
        StepNode("render_input", (), "render_input"),
        StepNode("slat_shaded", ("render_input", "voxelize"), "shade"),
        StepNode("render_relight", (), "render_relight"),
    ],
    [
        CallNode("render_lh", "render", transient=True),
        CallNode("voxelize", "encoder"),
        CallNode("encode", "encoder", also=("slat_lh", "slat_bc")),
        CallNode("latents", "encoder"),
        CallNode("render_input", "render"),
        CallNode("shade", "encoder"),
        CallNode("render_relight", "render"),
    ],
)
"""The real build's steps and calls (`pipelines.steps.StepTable.topology`), spelled out."""

ALL_STEPS = tuple(BUILD_TOPOLOGY.steps)
NODES = ("node-a", "node-b", "node-c")



@dataclasses.dataclass(frozen=True)
class Payload:
    """A worker's result for one key, unique per (call, step): the test follows it into `Dispatch.inputs`."""

    call_id: int
    step: str
    ok: bool
    reason: Reason | None = None


@dataclasses.dataclass(frozen=True)
class Arrival:
    """How an in-flight call ends: lost, or returned with a payload per key (a key left out: no result)."""

    outcomes: Mapping[str, Payload] = dataclasses.field(default_factory=dict)
    transient: Any = None
    node: str | None = None
    is_lost: bool = False


def _ok(d: Dispatch, step: str) -> Payload:
    return Payload(d.call_id, step, True)


def _failed(d: Dispatch, step: str, reason: Reason = Reason.RENDER_ERROR) -> Payload:
    return Payload(d.call_id, step, False, reason)


def _transient_read(topology: Topology) -> set[str]:
    """The steps that some step reads as a transient input."""
    return {name for step in topology.steps.values() for name in step.transient_inputs}


def _arrive_all_ok(topology: Topology, node: str = "node-a") -> Callable[[Dispatch], Arrival]:
    """Every key ok; a transient call leaves `lh:<call id>` on `node`."""

    def respond(d: Dispatch) -> Arrival:
        transient = f"lh:{d.call_id}" if topology.calls[d.call].transient else None
        return Arrival({s: _ok(d, s) for s in d.keys}, transient, node if transient else None)

    return respond


class _Checker:
    """Wraps a `Scheduler` as the build driver does, and asserts the guarantees after every call to it."""

    def __init__(self, topology: Topology, work: Mapping[str, Mapping[str, str]],
                 stored: Mapping[str, set[str]], *, max_in_flight: int, capacity: Mapping[str, int],
                 note: Callable[[str], None] = lambda what: None) -> None:
        self.topology, self.work, self.stored, self.note = topology, work, stored, note
        self.max_in_flight, self.capacity = max_in_flight, capacity
        self.scheduler = Scheduler(topology, work, stored, max_in_flight=max_in_flight, capacity=capacity)
        self.in_flight: dict[int, Dispatch] = {}
        self.log: list[Dispatch] = []
        self.made_by: dict[tuple[str, str], Dispatch] = {}
        """(asset, step) -> the dispatch whose keys hold it."""
        self.expected: dict[tuple[str, str], tuple[str, Any]] = {}
        """(asset, step) -> what its call's arrival or loss must settle it with."""
        self.settled: dict[tuple[str, str], Any] = {}
        self.transients: dict[tuple[str, int], tuple[Any, str | None]] = {}
        """(asset, call id) -> (transient, node) of every transient output that arrived."""
        self.latest: dict[tuple[str, str], tuple[int, Any, str | None]] = {}
        """(asset, call name) -> (call id, transient, node) of the last transient output that arrived."""
        self.transient_gone: set[tuple[str, str]] = set()
        """(asset, call name) of transient calls that ended without leaving an output."""
        self.discarded: list[tuple[str, int]] = []
        self.started: set[str] = set()
        self.readers = {call: {s for s, node in topology.steps.items()
                               if any(topology.steps[i].call == call for i in node.transient_inputs)}
                        for call in topology.calls}
        """Call -> the steps that read its transient output."""

    # -- the driver's side ----------------------------------------------------------------------------------

    def dispatch(self) -> list[Dispatch]:
        calls = self.scheduler.dispatch()  # raises "stalled" if work remains, none in flight and none ready
        for d in calls:
            self._check_dispatch(d)
        self._collect()
        return calls

    def arrive(self, call_id: int, arrival: Arrival) -> None:
        d = self.in_flight.pop(call_id)
        if arrival.is_lost:
            self.scheduler.lost(call_id, "worker died")
            self.expected.update(((d.asset, s), ("lost", Reason.WORKER_CRASHED)) for s in d.keys)
        else:
            self.scheduler.arrived(call_id, dict(arrival.outcomes), transient=arrival.transient,
                                   node=arrival.node)
            for step in d.keys:
                outcome = arrival.outcomes.get(step)
                self.expected[(d.asset, step)] = (
                    ("payload", outcome) if outcome is not None else ("no result", Reason.INVALID_OUTPUT))
        if self.topology.calls[d.call].transient:
            if arrival.transient is not None and not arrival.is_lost:
                self.transients[(d.asset, call_id)] = (arrival.transient, arrival.node)
                self.latest[(d.asset, d.call)] = (call_id, arrival.transient, arrival.node)
            else:
                self.transient_gone.add((d.asset, d.call))
        self._collect()

    def finish(self) -> None:
        assert self.scheduler.finished and not self.in_flight
        todo = {(a, s) for a, steps in self.work.items() for s in steps}
        assert set(self.settled) == todo, f"never settled: {sorted(todo - set(self.settled))}"
        assert sorted(self.discarded) == sorted(self.transients), "a transient output was never discarded"
        assert self.scheduler.dispatch() == []
        assert self.scheduler.take_settled() == [] and self.scheduler.take_discards() == []

    # -- checks ---------------------------------------------------------------------------------------------

    def _available(self, asset: str, step: str) -> Any:
        """What `Dispatch.inputs` must carry for input `step` now (its ok payload, or STORED), else None."""
        if step in self.work[asset]:
            outcome = self.settled.get((asset, step))
            return outcome if outcome is not None and outcome.ok else None
        return STORED if step in self.stored.get(asset, ()) else None

    def _failed_input(self, asset: str, step: str) -> str | None:
        """An input of `step` that failed (before this build, in it, or whose transient output is gone or can no
        longer be made, because an input of its own failed: the same rule, one level up)."""
        node = self.topology.steps[step]
        for name in node.inputs:
            if name not in self.work[asset] and name not in self.stored.get(asset, ()):
                return name  # failed in an earlier build
            outcome = self.settled.get((asset, name))
            if outcome is not None and not outcome.ok:
                return name
            source = (asset, self.topology.steps[name].call)
            if name in node.transient_inputs and source not in self.latest and (
                source in self.transient_gone or self._failed_input(asset, name) is not None
            ):
                return name
        return None

    def _check_dispatch(self, d: Dispatch) -> None:
        topo, call, todo = self.topology, self.topology.calls[d.call], self.work[d.asset]
        assert d.call_id not in self.in_flight and d.worker == call.worker, d
        for step, key in d.keys.items():
            assert topo.steps[step].call == d.call or step in call.also, f"{d.call} cannot make {step}"
            assert todo.get(step) == key, f"{d.asset}/{step}: not todo, or not its key: {key}"
            assert (d.asset, step) not in self.made_by, f"{d.asset}/{step} dispatched twice"
            assert (d.asset, step) not in self.settled, f"{d.asset}/{step} dispatched after it settled"
            self.made_by[(d.asset, step)] = d
        if not d.keys:  # runs only for its transient output, which an open step reads and which can be made
            assert call.transient, d
            waiting = [s for s in self.readers[d.call]
                       if s in todo and (d.asset, s) not in self.made_by and (d.asset, s) not in self.settled]
            assert waiting, f"keyless {d.call} call that no open step reads: {d}"
            assert any(all(self._available(d.asset, i) is not None for i in topo.steps[s].transient_inputs
                           if topo.steps[i].call == d.call) for s in waiting), (
                f"keyless {d.call} call before the steps it leaves exist: {d}")
            self.note("keyless transient call")
        # 5. every input exists: made by this call, settled ok earlier (that payload), or stored (STORED)
        expected_inputs: dict[str, Any] = {}
        sources: set[str] = set()
        for step in d.keys:
            node = topo.steps[step]
            for name in node.inputs:
                if name in d.keys:
                    continue
                value = self._available(d.asset, name)
                assert value is not None, f"{d.asset}/{step} dispatched ({d.call}) before its input {name}"
                if name in node.transient_inputs:
                    sources.add(topo.steps[name].call)
                else:
                    expected_inputs[name] = value
        assert dict(d.inputs) == expected_inputs, (d, expected_inputs)
        # 6. node affinity: the transient output its steps read, on the node where it was left
        assert len(sources) <= 1, f"test topology reads two transient calls in one call: {sources}"
        if sources:
            (source,) = sources
            assert (d.asset, source) in self.latest, f"{d.call} reads {source}'s output before it arrived"
            call_id, transient, node = self.latest[(d.asset, source)]
            assert (d.transient, d.node) == (transient, node), (d, transient, node)
            assert (d.asset, call_id) not in self.discarded, f"{d.call} reads a discarded transient"
            self.note("call pinned to a node")
        else:
            assert d.transient is None and d.node is None, d
        if any(s in call.also for s in d.keys):
            self.note("also step made")
        self.in_flight[d.call_id] = d
        self.log.append(d)
        self.started.add(d.asset)
        # 4. pool capacity
        running = collections.Counter(c.worker for c in self.in_flight.values())
        for worker, n in running.items():
            assert n <= self.capacity.get(worker, n), f"{n} {worker} calls in flight: {dict(self.capacity)}"
            if n == self.capacity.get(worker):
                self.note("pool at capacity")

    def _collect(self) -> None:
        for item in self.scheduler.take_settled():
            key = (item.asset, item.step)
            # 1. exactly once, todo only, under its key; failures carry a Reason
            assert item.step in self.work.get(item.asset, {}), f"{key} settled but is not todo"
            assert key not in self.settled, f"{key} settled twice"
            assert item.key == self.work[item.asset][item.step], item
            assert isinstance(item.outcome.ok, bool), item
            if not item.outcome.ok:
                assert isinstance(item.outcome.reason, Reason), item
            if key in self.made_by:  # its call's payload, no result (invalid_output), or a lost worker (8.)
                assert key in self.expected, f"{key} settled before its call returned"
                how, value = self.expected[key]
                if how == "payload":
                    assert item.outcome is value, (item, value)
                else:
                    assert isinstance(item.outcome, Failure) and item.outcome.reason == value, (item, how)
            else:  # 2. never dispatched: upstream_failed, once an input failed
                assert isinstance(item.outcome, Failure), item
                assert item.outcome.reason == Reason.UPSTREAM_FAILED, item
                assert self._failed_input(item.asset, item.step) is not None, f"{key} failed, no input failed"
                self.note("upstream_failed")
            self.settled[key] = item.outcome
            self.started.add(item.asset)
        for discard in self.scheduler.take_discards():
            # 7. once, the output that arrived, when no step left to dispatch and no call in flight reads it
            key = (discard.asset, discard.call_id)
            assert key in self.transients, f"discard of a transient output that never arrived: {discard}"
            assert key not in self.discarded, f"{discard} discarded twice"
            assert (discard.transient, discard.node) == self.transients[key], discard
            call = next(d.call for d in self.log if d.call_id == discard.call_id)
            for step in self.readers[call] & set(self.work[discard.asset]):
                assert (discard.asset, step) in self.settled or (discard.asset, step) in self.made_by, (
                    f"{discard} while {step} still needs it")
            assert not any(d.asset == discard.asset and d.transient == discard.transient
                           for d in self.in_flight.values()), f"{discard} while a call reading it runs"
            self.discarded.append(key)
        # 4. started assets that are not yet done
        busy = {d.asset for d in self.in_flight.values()} | {
            a for a in self.started if any((a, s) not in self.settled for s in self.work[a])}
        assert len(busy) <= self.max_in_flight, f"{len(busy)} assets in flight, max {self.max_in_flight}"
        assert self.scheduler.in_flight == len(self.in_flight)


def _drive(checker: _Checker, *, choose: Callable[[list[int]], int],
           respond: Callable[[Dispatch], Arrival]) -> None:
    """The build driver's loop, bounded (3.): dispatch what is ready, then one in-flight call returns."""
    n_transient = sum(c.transient for c in checker.topology.calls.values())
    # each call makes a new key, or is a transient call's one keyless run for the asset
    bound = sum(len(steps) + n_transient for steps in checker.work.values())
    for _ in range(bound + 1):
        if checker.scheduler.finished:
            break
        checker.dispatch()
        if not checker.in_flight:
            assert checker.scheduler.finished, "dispatch() returned nothing, none in flight, work remains"
            break
        call_id = choose(sorted(checker.in_flight))
        checker.arrive(call_id, respond(checker.in_flight[call_id]))
    else:
        pytest.fail(f"the build did not finish within {bound} arrivals")
    checker.finish()


def _run(topology: Topology, work: Mapping[str, Mapping[str, str]], stored: Mapping[str, set[str]], *,
         respond: Callable[[Dispatch], Arrival] | None = None, max_in_flight: int = 4,
         capacity: Mapping[str, int] | None = None) -> _Checker:
    """Drive a build in dispatch order (the oldest call returns first); return its checked record."""
    checker = _Checker(topology, work, stored, max_in_flight=max_in_flight, capacity=capacity or {})
    _drive(checker, choose=min, respond=respond or _arrive_all_ok(topology))
    return checker


# -- strategies --------------------------------------------------------------------------------------------


@st.composite
def dags(draw) -> Topology:
    """Small random topologies: 1-6 steps reading earlier steps, made by 1-4 calls on 1-2 pools; some calls
    transient (their steps may be read transiently by other calls' steps, from one transient call per call),
    some with `also` steps (of other, non-transient calls)."""
    n_steps = draw(st.integers(1, 6))
    n_calls = draw(st.integers(min(2, n_steps), min(4, n_steps)))
    pools = ["p0", "p1"][: draw(st.integers(1, 2))]
    names = [f"s{i}" for i in range(n_steps)]
    call_of = [f"c{draw(st.integers(0, n_calls - 1))}" for _ in names]
    transient = {f"c{j}": draw(st.booleans()) for j in range(n_calls)}
    also = {}
    for c in transient:  # not a transient call's step: another call would not leave that call's output
        picked = draw(st.sets(st.sampled_from(names), max_size=2)) if draw(st.integers(0, 2)) == 2 else set()
        also[c] = tuple(s for s, o in zip(names, call_of) if s in picked and o != c and not transient[o])
    source_of: dict[str, str] = {}  # call -> the one transient call whose output its steps (and `also`s) read
    steps = []
    for i, name in enumerate(names):
        earlier = list(range(i))
        inputs = tuple(names[j] for j in earlier if draw(st.integers(0, 2)) > 0)
        readers = [call_of[i], *(c for c in also if name in also[c])]
        transient_inputs = []
        for j in inputs:
            source = call_of[names.index(j)]
            if (transient[source] and source != call_of[i] and draw(st.integers(0, 3)) < 3
                    and all(source_of.get(c, source) == source for c in readers)):
                transient_inputs.append(j)
                source_of.update((c, source) for c in readers)
        steps.append(StepNode(name, inputs, call_of[i], tuple(transient_inputs)))
    calls = [CallNode(c, draw(st.sampled_from(pools)), also[c], transient[c]) for c in transient]
    return _topology(steps, calls)


@st.composite
def plans(draw, topology: Topology):
    """1-5 assets: todo steps closed downstream (as cache keys make them), stored steps closed upstream among
    the rest (an ok artifact's inputs were ok), the others failed before. Returns (work, stored)."""
    work: dict[str, dict[str, str]] = {}
    stored: dict[str, set[str]] = {}
    for a in range(draw(st.integers(1, 5))):
        asset = f"asset{a}"
        status: dict[str, str] = {}
        for name, step in topology.steps.items():
            upstream = {status[i] for i in step.inputs}
            if "todo" in upstream:
                status[name] = "todo"
            elif "failed" in upstream:
                status[name] = draw(st.sampled_from(["todo", "failed"]))
            else:
                status[name] = draw(st.sampled_from(["todo", "stored", "failed"]))
        work[asset] = {s: f"{asset}/{s}/key" for s, v in status.items() if v == "todo"}
        stored[asset] = {s for s, v in status.items() if v == "stored"}
    return work, stored


@st.composite
def builds(draw, topology: Topology | None = None):
    """(topology, work, stored, max_in_flight, capacity): capacity 1-3 or unbounded per pool."""
    topology = topology or draw(dags())
    work, stored = draw(plans(topology))
    pools = sorted({c.worker for c in topology.calls.values()})
    capacity = {pool: n for pool in pools if (n := draw(st.integers(0, 3)))}  # 0: unbounded
    return topology, work, stored, draw(st.integers(1, 3)), capacity


def _drawn_arrivals(data: st.DataObject, topology: Topology) -> Callable[[Dispatch], Arrival]:
    """Arrivals drawn by hypothesis: the call is lost, or each key is ok, failed or without result; a
    transient call leaves its output on a drawn node when every key read transiently is ok (a keyless one may
    fail)."""
    read = _transient_read(topology)

    def respond(d: Dispatch) -> Arrival:
        if data.draw(st.integers(0, 9), label=f"call {d.call_id} lost (9)") == 9:
            event("call lost")
            return Arrival(is_lost=True)
        outcomes = {}
        for step in d.keys:
            kind = data.draw(st.integers(0, 9), label=f"{d.asset}/{step}: ok 0-6, failed 7-8, no result 9")
            if kind < 7:
                outcomes[step] = _ok(d, step)
            elif kind < 9:
                outcomes[step] = _failed(d, step, data.draw(st.sampled_from(list(Reason))))
        transient = node = None
        if topology.calls[d.call].transient and all(
                step in outcomes and outcomes[step].ok for step in d.keys if step in read):
            if d.keys or data.draw(st.integers(0, 4), label="keyless call failed (4)") < 4:
                transient, node = f"lh:{d.asset}:{d.call_id}", data.draw(st.sampled_from(NODES))
        return Arrival(outcomes, transient, node)

    return respond


def _check_random_build(build, data: st.DataObject) -> None:
    topology, work, stored, max_in_flight, capacity = build
    checker = _Checker(topology, work, stored, max_in_flight=max_in_flight, capacity=capacity, note=event)
    _drive(checker, choose=lambda ids: data.draw(st.sampled_from(ids), label="returns"),
           respond=_drawn_arrivals(data, topology))


# -- properties --------------------------------------------------------------------------------------------


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(builds(BUILD_TOPOLOGY), st.data())
def test_build_topology_any_arrival_order_and_failures(build, data):
    _check_random_build(build, data)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(builds(), st.data())
def test_random_topology_any_arrival_order_and_failures(build, data):
    _check_random_build(build, data)


# -- examples on the real topology -------------------------------------------------------------------------


def _work(*todo: str, asset: str = "a") -> dict[str, dict[str, str]]:
    return {asset: {s: f"{asset}/{s}/key" for s in todo}}


def _by_call(checker: _Checker) -> dict[str, list[Dispatch]]:
    calls: dict[str, list[Dispatch]] = collections.defaultdict(list)
    for d in checker.log:
        calls[d.call].append(d)
    return dict(calls)


def _except(calls: Mapping[str, Callable[[Dispatch], Arrival]]) -> Callable[[Dispatch], Arrival]:
    """All ok on the real topology, except the calls named, which end as their function says."""
    return lambda d: calls.get(d.call, _arrive_all_ok(BUILD_TOPOLOGY))(d)


def test_fresh_asset_runs_each_call_once_and_encode_on_the_render_node():
    checker = _run(BUILD_TOPOLOGY, _work(*ALL_STEPS), {}, respond=_arrive_all_ok(BUILD_TOPOLOGY, "node-b"))
    calls = _by_call(checker)
    assert sorted(calls) == ["encode", "render_input", "render_lh", "render_relight", "shade", "voxelize"]
    assert all(len(ds) == 1 for ds in calls.values())  # no latents call: encode makes the latents
    (render,), (voxelize,), (encode,) = calls["render_lh"], calls["voxelize"], calls["encode"]
    (render_input,), (shade,) = calls["render_input"], calls["shade"]
    assert checker.log.index(render) < checker.log.index(voxelize) < checker.log.index(encode)
    assert set(render.keys) == {"render_lh", "normalize"} and render.inputs == {}
    assert voxelize.inputs == {"normalize": _ok(render, "normalize")}
    assert set(encode.keys) == {"features", "slat_lh", "slat_bc"}
    assert encode.inputs == {"voxelize": _ok(voxelize, "voxelize")}
    assert (encode.transient, encode.node) == (f"lh:{render.call_id}", "node-b")
    assert shade.inputs == {"render_input": _ok(render_input, "render_input"),
                            "voxelize": _ok(voxelize, "voxelize")}
    assert shade.node is None and len(checker.settled) == len(ALL_STEPS)
    assert all(o.ok for o in checker.settled.values())
    assert checker.discarded == [("a", render.call_id)]


def test_stored_render_runs_keyless_for_its_transient():
    stored = {"a": set(ALL_STEPS) - {"features", "slat_lh", "slat_bc"}}
    checker = _run(BUILD_TOPOLOGY, _work("features", "slat_lh", "slat_bc"), stored,
                   respond=_arrive_all_ok(BUILD_TOPOLOGY, "node-c"))
    render, encode = checker.log
    assert (render.call, dict(render.keys), render.node) == ("render_lh", {}, None)
    assert encode.call == "encode" and set(encode.keys) == {"features", "slat_lh", "slat_bc"}
    assert encode.inputs == {"voxelize": STORED}
    assert (encode.transient, encode.node) == (f"lh:{render.call_id}", "node-c")
    assert checker.discarded == [("a", render.call_id)]


def test_only_latents_todo_runs_one_latents_call_on_stored_features():
    stored = {"a": set(ALL_STEPS) - {"slat_lh", "slat_bc"}}
    checker = _run(BUILD_TOPOLOGY, _work("slat_lh", "slat_bc"), stored)
    (latents,) = checker.log
    assert latents.call == "latents" and set(latents.keys) == {"slat_lh", "slat_bc"}
    assert latents.inputs == {"features": STORED, "voxelize": STORED} and latents.transient is None and latents.node is None
    assert checker.discarded == []


@pytest.mark.parametrize("how", ["failed", "lost"])
def test_failed_render_fails_everything_downstream_upstream_failed(how):
    def render(d: Dispatch) -> Arrival:
        return Arrival(is_lost=True) if how == "lost" else Arrival({s: _failed(d, s) for s in d.keys})

    checker = _run(BUILD_TOPOLOGY, _work(*ALL_STEPS), {}, respond=_except({"render_lh": render}))
    assert sorted(d.call for d in checker.log) == ["render_input", "render_lh", "render_relight"]
    reason = Reason.WORKER_CRASHED if how == "lost" else Reason.RENDER_ERROR
    assert checker.settled[("a", "render_lh")].reason == checker.settled[("a", "normalize")].reason == reason
    for step in ("voxelize", "features", "slat_lh", "slat_bc", "slat_shaded"):
        outcome = checker.settled[("a", step)]
        assert isinstance(outcome, Failure) and outcome.reason == Reason.UPSTREAM_FAILED, (step, outcome)
    assert checker.settled[("a", "voxelize")].message.startswith(f"normalize failed: {reason.value}")
    assert checker.settled[("a", "render_input")].ok and checker.settled[("a", "render_relight")].ok
    assert checker.discarded == []


def test_failed_keyless_render_fails_features_and_latents():
    stored = {"a": set(ALL_STEPS) - {"features", "slat_lh", "slat_bc"}}
    checker = _run(BUILD_TOPOLOGY, _work("features", "slat_lh", "slat_bc"), stored,
                   respond=_except({"render_lh": lambda d: Arrival()}))  # no results, no transient output
    assert [d.call for d in checker.log] == ["render_lh"]
    assert {s for (_, s), o in checker.settled.items() if o.reason == Reason.UPSTREAM_FAILED} == {
        "features", "slat_lh", "slat_bc"}


def test_lost_encode_fails_its_keys_worker_crashed_and_still_discards_the_render():
    checker = _run(BUILD_TOPOLOGY, _work(*ALL_STEPS), {},
                   respond=_except({"encode": lambda d: Arrival(is_lost=True)}))
    for step in ("features", "slat_lh", "slat_bc"):
        outcome = checker.settled[("a", step)]
        assert isinstance(outcome, Failure) and outcome.reason == Reason.WORKER_CRASHED
    (render,) = _by_call(checker)["render_lh"]
    assert checker.discarded == [("a", render.call_id)]


def test_input_failed_before_settles_every_asset_without_a_call():
    todo = ("voxelize", "features", "slat_lh", "slat_bc", "slat_shaded")  # normalize failed before
    work = {f"a{i}": _work(*todo, asset=f"a{i}")[f"a{i}"] for i in range(3)}
    stored = {a: {"render_lh", "render_input", "render_relight"} for a in work}
    checker = _run(BUILD_TOPOLOGY, work, stored, max_in_flight=1)  # one dispatch() settles all three
    assert checker.log == []  # not even the keyless render: features can no longer run
    assert len(checker.settled) == 3 * len(todo)
    assert all(o.reason == Reason.UPSTREAM_FAILED for o in checker.settled.values())


def test_capacity_and_max_in_flight_on_many_assets():
    work = {f"a{i}": _work(*ALL_STEPS, asset=f"a{i}")[f"a{i}"] for i in range(6)}
    checker = _run(BUILD_TOPOLOGY, work, {}, max_in_flight=2, capacity={"render": 1, "encoder": 2})
    assert len(checker.settled) == 6 * len(ALL_STEPS) and len(checker.discarded) == 6


# -- regressions: shapes the random tests once found wrong -------------------------------------------------


@pytest.mark.parametrize("normalize", ["todo", "stored"])
def test_a_render_failed_before_fails_features_without_a_call(normalize):
    """With `render_lh` failed in an earlier build, `features` (which reads its transient output) fails
    `upstream_failed` at once: no encode runs on a render whose artifact is failed."""
    latents = ["features", "slat_lh", "slat_bc"]
    todo = [s for s in ALL_STEPS if s != "render_lh"] if normalize == "todo" else latents
    checker = _run(BUILD_TOPOLOGY, _work(*todo), {"a": set(ALL_STEPS) - set(todo) - {"render_lh"}})
    assert "encode" not in _by_call(checker)
    for step in ("features", "slat_lh", "slat_bc"):
        assert checker.settled[("a", step)].reason == Reason.UPSTREAM_FAILED


def _chain(*, transient: bool) -> Topology:
    """z (call cz) -> a (call c) -> b: b made by c too, or, when `transient`, by cb reading a transiently."""
    return _topology(
        [StepNode("z", (), "cz"), StepNode("a", ("z",), "c"),
         StepNode("b", ("a",), "cb", ("a",)) if transient else StepNode("b", ("a",), "c")],
        [CallNode("cz", "p"), CallNode("c", "p", transient=transient), CallNode("cb", "p")])


def test_a_call_waits_for_the_inputs_of_its_own_steps():
    """Call c makes a (reads z) and b (reads a): it waits for z and then makes both, never b alone."""
    checker = _run(_chain(transient=False), _work("z", "a", "b"), {})
    assert [(d.call, set(d.keys)) for d in checker.log] == [("cz", {"z"}), ("c", {"a", "b"})]


def test_no_keyless_transient_call_before_its_steps_exist():
    """Transient call c makes a (reads z), b reads a transiently: c runs once z exists, with a, not keyless
    before."""
    checker = _run(_chain(transient=True), _work("z", "a", "b"), {})
    assert [(d.call, set(d.keys)) for d in checker.log] == [("cz", {"z"}), ("c", {"a"}), ("cb", {"b"})]


def test_every_transient_output_is_discarded():
    """A transient call that runs twice for an asset (its steps ready at different times) has both outputs
    discarded."""
    topology = _topology([StepNode("z", (), "cz"), StepNode("a", ("z",), "c"), StepNode("b", (), "c")],
                         [CallNode("cz", "p"), CallNode("c", "p", transient=True)])
    checker = _run(topology, _work("z", "a", "b"), {})
    assert len(checker.discarded) == 2


def test_an_also_step_gets_its_transient_and_node():
    """A step a call makes through `also` brings its transient input: the call carries it and runs on its node."""
    topology = _topology(
        [StepNode("a", (), "t"), StepNode("e", ("a",), "ce"), StepNode("f", ("a",), "cf", ("a",))],
        [CallNode("t", "p", transient=True), CallNode("ce", "p", also=("f",)), CallNode("cf", "p")])
    checker = _run(topology, _work("a", "e", "f"), {}, respond=_arrive_all_ok(topology, "node-b"))
    (ce,) = _by_call(checker)["ce"]
    assert set(ce.keys) == {"e", "f"} and (ce.transient, ce.node) == ("lh:0", "node-b")


def test_the_spelled_out_topology_is_the_step_tables(tmp_path):
    """BUILD_TOPOLOGY is what `pipelines.steps.build_table` declares for the assets' steps."""
    weights = {name: WeightsInfo(name, "0" * 64, True) for name in ("dinov2", "slat_encoder", "slat_flow")}
    maps = EnvMaps({"sky.exr": (tmp_path / "sky.exr", "1" * 64)}, {"input": ("sky.exr",), "relight": ("sky.exr",)})
    real = build_table(BuildConfig(data_root=tmp_path), weights, "5.0.1", maps).topology()
    assert {n: s for n, s in real.steps.items() if n in BUILD_TOPOLOGY.steps} == dict(BUILD_TOPOLOGY.steps)
    assert {n: c for n, c in real.calls.items() if n in BUILD_TOPOLOGY.calls} == dict(BUILD_TOPOLOGY.calls)
