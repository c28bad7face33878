"""Build an LH-SLAT dataset: what `ray job submit` runs.

    ray job submit --working-dir . -- python pipelines/build_lh_slat.py --config build.yaml

As a plain script it starts a local Ray; `near build --config` runs the same code.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # the working dir, where `ray job submit` unpacks

from infra.errors import FactoryError
from infra.logs import setup_logging
from pipelines.build import run_build
from pipelines.build_config import BuildConfig
from pipelines.report import write_report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, required=True, help="build YAML")
    parser.add_argument("--retry-failed", action="store_true", help="run failed artifacts again")
    args = parser.parse_args()
    setup_logging(1)
    try:
        config = BuildConfig.from_yaml(args.config)
        record = run_build(
            config,
            retry_failed=args.retry_failed,
            on_progress=lambda message, done, total: print(f"[{done}/{total}] {message}", flush=True),
        )
    except FactoryError as err:  # a refusal (bad config, foreign catalog, ...): one line, as `near` prints it
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    report = write_report(record, config.data_root)
    print(f"computed {record.computed_by_step()}; report {report}", flush=True)
    if record.release:
        print(f"release {record.release.get('name')}", flush=True)


if __name__ == "__main__":
    main()
