"""Render a list of asset files with one recipe on this machine, through one supervised render child."""

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from catalogs.keys import sha256_file
from render_jobs.protocol import RenderRequest, RenderResult
from render_jobs.recipes import RecipeConfig
from render_jobs.render_set import FrameFormat
from render_jobs.supervisor import RenderSupervisor, RenderWorkerConfig


def asset_dir_name(path: Path, source_id: str) -> str:
    """`<stem>-<sha256[:12]>`: readable, and unique per content."""
    return f"{path.stem}-{source_id[:12]}"


@dataclasses.dataclass(frozen=True)
class AssetRecord:
    """One line of a render report: the input file and what became of it."""

    path: str
    sha256: str | None
    result: RenderResult

    def to_dict(self) -> dict[str, Any]:
        r = self.result
        return {"path": self.path, "sha256": self.sha256, "status": r.status, "reason": r.reason, "message": r.message,
                "output_dir": r.out_dir, "stats": r.stats, "timings_s": r.timings_s, "stderr_tail": r.stderr_tail}


def render_files(
    paths: list[Path], recipe: RecipeConfig, out_dir: Path, *, worker: RenderWorkerConfig,
    supervisor: RenderSupervisor | None = None, frame_format: FrameFormat = "exr",
) -> Iterator[AssetRecord]:
    """Render every file in `paths` into `out_dir/<stem>-<sha12>/`, yielding one record per file in order.

    Files that cannot be read become failed records; one bad asset never stops the others.
    """
    own = supervisor is None
    supervisor = supervisor or RenderSupervisor(worker)
    try:
        for path in paths:
            try:
                source_id = sha256_file(path)
            except OSError as err:
                yield AssetRecord(str(path), None, RenderResult(str(path), "failed", reason="import_error", message=str(err)))
                continue
            request = RenderRequest(
                asset_path=str(Path(path).resolve()),
                out_dir=str((out_dir / asset_dir_name(path, source_id)).resolve()),
                source_id=source_id,
                recipe=recipe.to_dict(),
                frame_format=frame_format,
            )
            yield AssetRecord(str(path), source_id, supervisor.render(request))
    finally:
        if own:
            supervisor.close()
