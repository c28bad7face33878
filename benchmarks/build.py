"""Build benchmarks: a real config build end to end, or the driver's data path at paper sizes.

End to end: assets per hour and compute time per step, from the build's own records, with GPU and CPU
utilization sampled every second.

    python benchmarks/build.py --config near-demo/build.yaml --out benchmarks/results/build_demo_cpu.json
    python benchmarks/build.py --config /tmp/paper/build.yaml --keep --out build_h100.json   # benchmarks/gpu_node

Runs one build of the config into a fresh data root (so everything is computed, nothing reused) and records
wall time, assets per hour, and per step the summed compute seconds of the actor calls (renders and encodes
overlap, so the steps add up to more than the wall time when several actors run).

Data path: what the driver holds and receives while a 2-node `ray.cluster_utils` cluster builds paper-size
`input` (8 views x 1 lighting) and `relight` (12 views x 16 lightings, every pass) sets at 512^2.

    python benchmarks/build.py --data-path --assets 40 --out benchmarks/results/build_data_path_cpu.json

The step table keeps `render_input` and `render_relight` only, and their compute function is
`synthetic_render`: arrays of exactly the step's declared schema that compress like renders (smooth shading on
an object disc, a little noise, a transparent background), made without Blender. The driver process measures
its RSS every 50 ms (and `getrusage`'s peak), the bytes `ray.get` hands it (`serialized_bytes`: Ray's
pickle-5 size, numpy buffers counted without being copied), the wall time, and the bytes the build wrote under
the data root (then deleted). Each run adds its entry (replacing one of the same variant and asset count) to
`--out`. The numbers before the driver stopped carrying arrays come from the same harness run against that
commit's tree (`measure_data_path` with its own `build`); `docs/benchmarks.md` says how.
"""

import _thread
import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.monitor import UtilizationSampler
from pipelines.build import run_build
from pipelines.build_config import BuildConfig
from pipelines.report import write_report

REPO = Path(__file__).resolve().parents[1]
MiB, GiB = 1 << 20, 1 << 30
DATA_PATH_ROLES = ("input", "relight")
"""The release roles whose steps the data-path benchmark keeps: the arrays the size of the issue (`relight` is
566 MB per asset at paper size)."""
DATA_PATH_METHOD = (
    "A ray.cluster_utils.Cluster of 2 nodes on this machine (each its own raylet and object store, 2 "
    "declared CPUs, 1 render_slot), the driver connected to it. N distinct one-triangle OBJ files as a "
    "local source, the paper's recipes (input 8 x 1, relight 12 x 16, 512^2, every pass), demo models. "
    "The render_input and render_relight calls return synthetic arrays of exactly the after's declared "
    "schema (`schemas`), seeded by the asset, with the stats a render records (a lighting record per "
    "frame); their content compresses to about 0.3 like the demo's renders. Driver: RSS sampled every 50 "
    "ms with psutil (peak_rss; peak_rss_private is rss - shared, i.e. without the object store pages a "
    "zero-copy ray.get maps), getrusage ru_maxrss; received_bytes: every value ray.get returns in the "
    "driver, sized as Ray serializes it (pickle 5, numpy buffers out of band, counted not copied). "
    "wall_s: run_build from ingest to its return (cluster start excluded). written: every file under the "
    "data root after the build (then deleted). Other work shared the 2 cores: wall times are indicative."
)
ArraySchema = Sequence[tuple[str, str, tuple[int, ...]]]
"""(name, dtype, shape) of each array of one asset's step output."""


# -- the end-to-end benchmark --------------------------------------------------------------------------------


def end_to_end(config_path: Path, out: Path, keep: bool) -> None:
    """One build of the config; with `keep`, into its own data root with its release (to verify and look at),
    else into a fresh temporary one without a release. GPU and CPU utilization are sampled throughout: the
    stretches where the GPU idles are the build's serial parts (start-up, model loading, the last encodes)."""
    config = BuildConfig.from_yaml(config_path)
    with tempfile.TemporaryDirectory() as tmp:
        if not keep:
            config = dataclasses.replace(
                config, data_root=str(Path(tmp) / "data"), release=dataclasses.replace(config.release, name=None)
            )
        with UtilizationSampler(interval_s=1.0) as usage:
            record = run_build(config)
        report = write_report(record, config.data_root) if keep else None
    assets = len({*record.asset_seconds})
    computed = record.computed_by_step()
    busy = [t for t, value in usage.gpu if value > 0.05]
    result = {
        "config": str(config_path),
        "command": " ".join(sys.argv),
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "gpu": _gpu_name()},
        "python": platform.python_version(),
        "assets": assets,
        "wall_s": record.seconds,
        "assets_per_hour": assets / record.seconds * 3600,
        "utilization": {
            **usage.summary(),
            "gpu_first_busy_s": busy[0] if busy else None,
            "gpu_last_busy_s": busy[-1] if busy else None,
            "gpu_busy_between_first_and_last": usage.mean(usage.gpu, busy[0], busy[-1]) if busy else None,
            "gpu_series": usage.gpu,
            "cpu_series": usage.cpu,
        },
        "recipes": {name: recipe.to_dict() for name, recipe in config.recipes.items()},
        "execution": dataclasses.asdict(config.execution),
        "steps": {
            step: {
                "computed": computed.get(step, {}),
                "compute_s": record.step_seconds.get(step, 0.0),
                "compute_s_per_asset": record.step_seconds.get(step, 0.0) / max(assets, 1),
            }
            for step in record.planned
        },
        "failures": [{k: f[k] for k in ("asset_id", "step", "reason")} for f in record.failures],
        "release": record.release,
        "report": str(report) if report else None,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(json.dumps({k: result[k] for k in ("assets", "wall_s", "assets_per_hour")}),
          json.dumps({k: v for k, v in result["utilization"].items() if not k.endswith("series")}), f"-> {out}")


def _gpu_name() -> str | None:
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    except FileNotFoundError:
        return None
    return smi.stdout.strip() or None


# -- synthetic render sets -----------------------------------------------------------------------------------


def synthetic_arrays(schema: ArraySchema, *, seed: int) -> dict[str, np.ndarray]:
    """Arrays of exactly `schema`: images (rows, H, W[, C]) like renders (`_render_like`), the per-frame and
    per-view records (frame_view, c2w, ...) seeded values of their dtype.

    Raises:
        ValueError: a dimension given by name (a per-asset size): a synthetic set needs every size.
    """
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, dtype, shape in schema:
        if not all(isinstance(n, int) for n in shape):
            raise ValueError(f"{name}: shape {shape} has a per-asset dimension; a synthetic set needs sizes")
        if len(shape) >= 3:
            arrays[name] = _render_like(tuple(shape), np.dtype(dtype), rng)
        else:
            arrays[name] = rng.uniform(0, 16, shape).astype(dtype)
    return arrays


def _render_like(shape: tuple[int, ...], dtype: np.dtype, rng: np.random.Generator) -> np.ndarray:
    """(rows, H, W[, C]): per row a disc (the object, 30-70 % of the frame) of smooth per-channel gradients
    with 2.5 % noise, zero outside; packed, about 0.3 of its bytes (the demo's renders: 0.26)."""
    rows, height, width = shape[:3]
    channels = shape[3] if len(shape) > 3 else 1
    y, x = np.meshgrid(
        np.linspace(-1, 1, height, dtype=np.float32),
        np.linspace(-1, 1, width, dtype=np.float32),
        indexing="ij",
    )
    noise = (rng.standard_normal((height, width, channels)) * 0.025).astype(np.float32)
    out = np.empty(shape, dtype)
    for row in range(rows):
        cx, cy = rng.uniform(-0.2, 0.2, 2)
        inside = ((x - cx) ** 2 + (y - cy) ** 2 < rng.uniform(0.6, 0.95) ** 2)[..., None]
        slope_x, slope_y, level = rng.uniform(0.2, 0.8, (3, channels)).astype(np.float32)
        shading = level + 0.3 * (slope_x * x[..., None] + slope_y * y[..., None])
        out[row] = ((shading + np.roll(noise, int(rng.integers(height)), axis=0)) * inside).reshape(shape[1:])
    return out


def synthetic_stats(frames: int, *, seed: int) -> dict[str, Any]:
    """What a render records beside its arrays, at its real size: the asset's import stats, a `lighting`
    record per frame (an env map, its yaw and strength, as `render_jobs.lighting.env_map` gives it) and
    timings; it travels to the driver in both data paths."""
    rng = np.random.default_rng(seed)
    maps = (
        "studio.exr",
        "forest.exr",
        "city.exr",
        "courtyard.exr",
        "interior.exr",
        "night.exr",
        "sunrise.exr",
        "sunset.exr",
    )
    lighting = [
        {
            "kind": "env_map",
            "rig": "env_map",
            "strength": 1.0,
            "env_map": maps[int(rng.integers(len(maps)))],
            "yaw_rad": float(rng.uniform(0, 2 * np.pi)),
            "lights": [],
        }
        for _ in range(frames)
    ]
    imported = {
        "vertices": 24_000,
        "faces": 48_000,
        "materials": 3,
        "textures": 5,
        "missing_textures": 0,
        "max_alpha_coverage": 0.42,
        "has_base_color_texture": True,
        "has_metallic_roughness_texture": True,
        "has_normal_texture": True,
    }
    return {
        **imported,
        "lighting": lighting,
        "synthetic": True,
        "timings_s": {"import_s": 0.4, "render_s": 4.3, "write_s": 0.6},
    }


def asset_seed(source_id: str) -> int:
    return int(source_id[:8], 16)


def synthetic_render(worker: Any, request: Any, inputs: Any) -> Any:
    """A render step's compute function (`pipelines.steps.Call.compute`) that makes its declared arrays
    (`request.schemas`) without Blender: `worker.render` is never called, so no render child starts."""
    from pipelines.compute import CallOutput, StepOutput

    (step,) = request.keys
    clock = time.perf_counter()
    schema = [(spec.name, spec.dtype, spec.shape) for spec in request.schemas[step]]
    arrays = synthetic_arrays(schema, seed=asset_seed(request.source_id))
    stats = {
        **synthetic_stats(len(arrays["frame_view"]), seed=asset_seed(request.source_id)),
        "node": worker.node,
    }
    return CallOutput({step: StepOutput(arrays, stats, time.perf_counter() - clock)})


def synthetic_render_table(table: Any) -> Any:
    """`run_build(customize=...)`: the step table's steps of the `input` and `relight` roles, made by
    `synthetic_render`, and nothing else."""
    from pipelines.steps import StepTable

    steps = [table[table.roles[role]] for role in DATA_PATH_ROLES]
    steps = [dataclasses.replace(step, call=dataclasses.replace(step.call, compute=synthetic_render)) for step in steps]
    return StepTable(steps, list(table.workers.values()))


# -- measuring the driver ------------------------------------------------------------------------------------


def serialized_bytes(value: Any) -> int:
    """Bytes of `value` as Ray serializes it (pickle protocol 5, buffers out of band): numpy buffers are
    counted by size, never copied, so measuring adds nothing to the RSS it measures."""
    buffers: list[Any] = []
    inband = ray.cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    return len(inband) + sum(buffer.raw().nbytes for buffer in buffers)


class DriverMeter:
    """Measures this process (the driver) while a build runs, as a context manager: its RSS every
    `interval_s`, and every value `ray.get` returns here (`ray.get` is wrapped while inside). Stops the build
    (KeyboardInterrupt in the main thread) if the RSS passes `rss_limit_bytes` or the machine's available
    memory drops under `min_available_bytes`: `tripped` then says why."""

    def __init__(self, *, rss_limit_bytes: int, min_available_bytes: int, interval_s: float = 0.05) -> None:
        self.rss_limit_bytes, self.min_available_bytes, self.interval_s = (
            rss_limit_bytes,
            min_available_bytes,
            interval_s,
        )
        self.process = psutil.Process()
        self.rss_at_start = self.process.memory_info().rss
        self.peak_rss = self.peak_private = self.samples = 0
        self.min_available = psutil.virtual_memory().available
        self.gets = self.received = self.largest = 0
        self.tripped: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="driver-meter", daemon=True)
        self._ray_get = ray.get

    def __enter__(self) -> "DriverMeter":
        original = self._ray_get

        def counting_get(*args: Any, **kwargs: Any) -> Any:
            value = original(*args, **kwargs)
            size = serialized_bytes(value)
            self.gets, self.received, self.largest = (
                self.gets + 1,
                self.received + size,
                max(self.largest, size),
            )
            return value

        ray.get = counting_get
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        ray.get = self._ray_get
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            memory = self.process.memory_info()
            available = psutil.virtual_memory().available
            self.samples += 1
            self.peak_rss = max(self.peak_rss, memory.rss)
            self.peak_private = max(self.peak_private, memory.rss - memory.shared)
            self.min_available = min(self.min_available, available)
            if self.tripped is not None:
                if memory.rss > 1.25 * self.rss_limit_bytes or available < self.min_available_bytes / 2:
                    os.kill(
                        os.getpid(), signal.SIGKILL
                    )  # the interrupt did not stop it; Ray's reaper cleans up
                continue
            if memory.rss > self.rss_limit_bytes:
                limit = self.rss_limit_bytes / GiB
                self.tripped = f"driver RSS {memory.rss / GiB:.2f} GiB passed the {limit:.1f} GiB limit"
            elif available < self.min_available_bytes:
                self.tripped = (
                    f"machine's available memory {available / GiB:.2f} GiB fell under "
                    f"{self.min_available_bytes / GiB:.1f} GiB (driver RSS {memory.rss / GiB:.2f} GiB)"
                )
            else:
                continue
            _thread.interrupt_main()

    def to_dict(self, assets: int) -> dict[str, Any]:
        return {
            "peak_rss_mib": round(self.peak_rss / MiB, 1),
            "peak_rss_private_mib": round(self.peak_private / MiB, 1),
            "rss_at_start_mib": round(self.rss_at_start / MiB, 1),
            "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_samples": self.samples,
            "min_available_mib": round(self.min_available / MiB, 1),
            "received_bytes": self.received,
            "received_bytes_per_asset": round(self.received / max(assets, 1)),
            "ray_get_calls": self.gets,
            "largest_get_bytes": self.largest,
        }


@dataclasses.dataclass(frozen=True)
class ClusterShape:
    """The benchmark's `ray.cluster_utils.Cluster`: every node on this machine, each a separate raylet and
    object store, so results cross node boundaries as on a real cluster."""

    nodes: int = 2
    num_cpus: int = 2
    """Declared, not this machine's cores: one render and one encoder actor per node."""
    render_slots: int = 1
    object_store_mib: int = 2048
    """Per node; bounds the shared memory the before's 0.6 GB results can pin (Ray spills past it)."""

    def start(self) -> Any:
        from ray.cluster_utils import Cluster

        node = {
            "num_cpus": self.num_cpus,
            "resources": {"render_slot": self.render_slots},
            "object_store_memory": self.object_store_mib * MiB,
        }
        cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
        for _ in range(self.nodes - 1):
            cluster.add_node(**node)
        cluster.wait_for_nodes()
        return cluster


def write_asset_files(folder: Path, count: int) -> Path:
    """`count` distinct one-triangle OBJ files (the `local` source takes them; the synthetic steps never read
    them)."""
    folder.mkdir(parents=True)
    for i in range(count):
        (folder / f"asset_{i:04d}.obj").write_text(
            f"# data-path benchmark asset {i}\nv 0 0 0\nv 1 0 0\nv 0 1 {i}\nf 1 2 3\n"
        )
    return folder


def data_path_config(tmp: Path, assets: Path, models: dict[str, Path]) -> dict[str, Any]:
    """The build config (as YAML would give it): a local source, the paper's recipes (the defaults), small
    demo models (only their digests are read), no release, the execution defaults."""
    return {
        "data_root": str(tmp / "data"),
        "source": {"kind": "local", "path": str(assets)},
        "models": {name: str(path) for name, path in models.items()},
    }


def _disk_usage(root: Path) -> dict[str, int]:
    usage = {"bytes": 0, "files": 0, "pack_bytes": 0, "pack_files": 0}
    for folder, _, files in os.walk(root):
        is_pack = Path(folder).is_relative_to(root / "packs")
        for name in files:
            size = os.lstat(os.path.join(folder, name)).st_size
            usage["bytes"] += size
            usage["files"] += 1
            usage["pack_bytes"] += size if is_pack else 0
            usage["pack_files"] += is_pack
    return usage


@contextlib.contextmanager
def _private_ray_tmpdir(folder: Path) -> Iterator[None]:
    """Ray's temp folder (sessions, spilled objects, and `ray_current_cluster`, which a bare `ray.init()` on
    this machine would otherwise connect to) set to `folder` for the cluster's processes while inside."""
    before = os.environ.get("RAY_TMPDIR")
    folder.mkdir(parents=True)
    os.environ["RAY_TMPDIR"] = str(folder)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_TMPDIR")
        else:
            os.environ["RAY_TMPDIR"] = before


def measure_data_path(
    build: Callable[[dict[str, Any]], Any],
    *,
    assets: int,
    variant: str,
    shape: ClusterShape = ClusterShape(),
    rss_limit_gib: float = 12.0,
    min_available_gib: float = 2.0,
) -> dict[str, Any]:
    """One build of `assets` synthetic assets on a fresh cluster of `shape`, by `build(config dict) ->
    BuildRecord` (the tree under test parses the dict), measured in this process; the data root is deleted."""
    from pipelines.demo import write_demo_models

    with (
        tempfile.TemporaryDirectory(prefix="near-dp-") as tmp_name,
        _private_ray_tmpdir(Path(tmp_name) / "r"),
    ):
        tmp = Path(tmp_name)
        models = write_demo_models(tmp / "models", seed=0)
        config = data_path_config(tmp, write_asset_files(tmp / "assets", assets), models)
        cluster = shape.start()
        try:
            ray.init(address=cluster.address, log_to_driver=False)
            meter = DriverMeter(
                rss_limit_bytes=int(rss_limit_gib * GiB), min_available_bytes=int(min_available_gib * GiB)
            )
            record = None
            with meter:
                clock = time.perf_counter()
                try:
                    record = build(config)
                except KeyboardInterrupt:
                    if meter.tripped is None:
                        raise
                wall_s = time.perf_counter() - clock
        finally:
            ray.shutdown()
            cluster.shutdown()
        written = _disk_usage(tmp / "data")
    result = {
        "variant": variant,
        "assets": assets,
        "completed": record is not None,
        "stopped": meter.tripped,
        "wall_s": round(wall_s, 1),
        "driver": meter.to_dict(assets),
        "written": {**written, "bytes_per_asset": round(written["bytes"] / assets)},
        "measured_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if record is not None:
        result["committed"] = record.computed_by_step()
        result["build_s"] = round(record.seconds, 1)
    return result


def record_run(out: Path, run: dict[str, Any], **context: Any) -> None:
    """Add `run` to the results file `out` (replacing a run of the same variant and asset count) and merge
    `context` into its top level."""
    results = json.loads(out.read_text()) if out.exists() else {}
    runs = [
        r for r in results.get("runs", []) if (r["variant"], r["assets"]) != (run["variant"], run["assets"])
    ]
    results.update(context)
    results["runs"] = sorted([*runs, run], key=lambda r: (r["variant"] != "before", r["assets"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()


def data_path(assets: int, out: Path, shape: ClusterShape) -> None:
    """The data-path benchmark of this tree (the "after"), added to `out`."""
    from pipelines.steps import render_arrays
    from render_jobs.recipes import recipe_config

    schemas = {
        role: [[spec.name, spec.dtype, list(spec.shape)] for spec in render_arrays(recipe_config(role))]
        for role in DATA_PATH_ROLES  # the `input` and `relight` roles are made by recipes of the same names
    }
    run = measure_data_path(
        lambda config: run_build(BuildConfig.from_dict(config), customize=synthetic_render_table),
        assets=assets,
        variant="after",
        shape=shape,
    )
    run["tree"] = {"commit": _git("rev-parse", "HEAD"), "dirty": bool(_git("status", "--porcelain", "--untracked-files=no"))}
    raw = {
        role: sum(int(np.prod(shape_)) * np.dtype(dtype).itemsize for _, dtype, shape_ in schema)
        for role, schema in schemas.items()
    }
    record_run(
        out,
        run,
        benchmark="build data path (issue acceptance point 4)",
        method=DATA_PATH_METHOD,
        machine={
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / GiB, 1),
        },
        versions={"python": platform.python_version(), "ray": ray.__version__, "numpy": np.__version__},
        cluster=dataclasses.asdict(shape),
        recipes={name: recipe_config(name).to_dict() for name in ("input", "relight")},
        schemas=schemas,
        raw_bytes_per_asset={**raw, "total": sum(raw.values())},
    )
    driver = run["driver"]
    print(
        json.dumps(
            {
                "variant": "after",
                "assets": assets,
                "wall_s": run["wall_s"],
                "peak_rss_mib": driver["peak_rss_mib"],
                "received_bytes_per_asset": driver["received_bytes_per_asset"],
                "stopped": run["stopped"],
            }
        ),
        f"-> {out}",
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--config", type=Path, help="end to end: build this config")
    mode.add_argument("--data-path", action="store_true", help="the driver's data path at paper sizes")
    parser.add_argument("--assets", type=int, default=40, help="--data-path: assets to build")
    parser.add_argument("--keep", action="store_true", help="--config: build into its data root, with its release")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.config:
        end_to_end(args.config, args.out, args.keep)
    else:
        data_path(args.assets, args.out, ClusterShape())


if __name__ == "__main__":
    main()
