"""End-to-end build benchmark: assets per hour and compute time per step, from the build's own records.

    python benchmarks/build.py --config near-demo/build.yaml --out benchmarks/results/build_demo_cpu.json

Runs one build of the config into a fresh data root (so everything is computed, nothing reused) and records
wall time, assets per hour, and per step the summed compute seconds of the actor calls (renders and encodes
overlap, so the steps add up to more than the wall time when several actors run).
"""

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.build import run_build
from pipelines.build_config import BuildConfig


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    config = BuildConfig.from_yaml(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = dataclasses.replace(
            config, data_root=Path(tmp) / "data", release=dataclasses.replace(config.release, name=None)
        )
        record = run_build(fresh)
    assets = len({*record.asset_seconds})
    computed = record.computed_by_step()
    result = {
        "config": str(args.config),
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "assets": assets,
        "wall_s": record.seconds,
        "assets_per_hour": assets / record.seconds * 3600,
        "recipes": {name: recipe.to_dict() for name, recipe in config.recipes.items()},
        "steps": {
            step: {
                "computed": computed.get(step, {}),
                "compute_s": record.step_seconds.get(step, 0.0),
                "compute_s_per_asset": record.step_seconds.get(step, 0.0) / max(assets, 1),
            }
            for step in record.planned
        },
        "failures": len(record.failures),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("assets", "wall_s", "assets_per_hour")}), f"-> {args.out}")


if __name__ == "__main__":
    main()
