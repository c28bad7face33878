"""`near relight IMAGE --mesh MESH --stage1 RUN --stage2 RUN`: the paper's inference pipeline on one image."""

from pathlib import Path

import click
from rich.console import Console

console = Console(stderr=True)


@click.command("relight")
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--mesh", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Geometry prior: a PLY mesh in the canonical frame (Z up, front towards -Y; normalized here).")
@click.option("--stage1", "stage1_run", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--stage2", "stage2_run", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--env-map", "env_maps", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="An .exr environment map (repeatable); default: the held-out maps of the Stage 2 release.")
@click.option("--views", type=int, default=60, show_default=True, help="Turntable frames.")
@click.option("--rotation-frames", type=int, default=36, show_default=True,
              help="Frames of the map turning under the front camera.")
@click.option("--resolution", type=int, default=512, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("relight"), show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def relight_command(image: Path, mesh: Path, stage1_run: Path, stage2_run: Path, env_maps: tuple[Path, ...],
                    views: int, rotation_frames: int, resolution: int, out: Path, seed: int) -> None:
    """Relight an object from one image: per environment map a turntable (frames and GIF), the predicted base
    colour, roughness, metallic and shadow, the map turning under a fixed camera, and a 3DGS PLY."""
    from training.relight import RelightSettings, relight

    settings = RelightSettings(image=image, mesh=mesh, stage1_run=stage1_run, stage2_run=stage2_run, out_dir=out,
                               env_maps=env_maps, views=views, rotation_frames=rotation_frames,
                               resolution_px=resolution, seed=seed)
    with console.status("relighting") as status:
        summary = relight(settings, on_step=lambda message: status.update(message))
    for name, outputs in summary["env_maps"].items():
        console.print(f"{name}: {outputs['folder']} ({outputs['turntable']} turntable frames, "
                      f"{outputs['gaussians']} Gaussians in gaussians.ply)")
    console.print(f"summary: {out / 'relight.json'}")
