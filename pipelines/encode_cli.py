"""`near encode`: one render set through voxelization, DINOv2, back-projection and the SLAT encoder (debugging).

Loaded lazily by `pipelines.cli`, so commands that do not encode never import torch or transformers.
"""

from pathlib import Path
from typing import get_args

import click
import torch
from rich.console import Console
from rich.table import Table

from encoders.asset_encoder import DEFAULT_SLAT_ENCODER, AssetEncoder, AssetEncoderConfig
from encoders.attention import AttentionBackend
from encoders.backproject import BackprojectConfig
from encoders.dinov2 import DEFAULT_DINOV2, Dinov2Config
from infra.errors import FactoryError

console = Console(stderr=True)


@click.command()
@click.argument("render_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--dinov2", default=DEFAULT_DINOV2, show_default=True, help="DINOv2 ViT-L/14-reg: local folder or hub id."
)
@click.option(
    "--slat-encoder",
    default=DEFAULT_SLAT_ENCODER,
    show_default=True,
    help="SLAT VAE encoder: local .safetensors (TRELLIS .json beside it) or hub id owner/repo/path/name.",
)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder.")
@click.option(
    "--device", default="auto", show_default=True, help="cuda, cuda:N, cpu, or auto (cuda when present)."
)
@click.option("--batch-size", type=int, default=32, show_default=True, help="Views per DINOv2 forward pass.")
@click.option(
    "--visibility", is_flag=True, help="Average features only over views that see each voxel (depth test)."
)
@click.option(
    "--attention-backend", type=click.Choice(get_args(AttentionBackend)), default="auto", show_default=True
)
def encode(
    render_dir: Path,
    dinov2: str,
    slat_encoder: str,
    out: Path,
    device: str,
    batch_size: int,
    visibility: bool,
    attention_backend: str,
) -> None:
    """Encode one `lh` render set: voxels, DINOv2 features and the LH and base-color SLATs, as npz files."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_device = torch.device(device)
    config = AssetEncoderConfig(
        dinov2=Dinov2Config(model=dinov2, batch_size=batch_size),
        slat_encoder=slat_encoder,
        backproject=BackprojectConfig(use_visibility=visibility),
        attention_backend=attention_backend,
    )
    try:
        with console.status(f"loading models on {torch_device}"):
            encoder = AssetEncoder(config, device=torch_device)
        with console.status(f"encoding {render_dir.name}"):
            encoding = encoder.encode(render_dir)
    except FactoryError:
        raise
    except (ValueError, OSError) as err:  # unreadable weights or render set
        raise click.ClickException(str(err)) from err
    encoding.save(out)
    table = Table(
        title=f"{render_dir.name}: {encoding.meta['num_voxels']} voxels, {encoding.meta['num_views']} views"
    )
    table.add_column("step")
    table.add_column("seconds", justify="right")
    for step, seconds in encoding.meta["timings"].items():
        table.add_row(step.removesuffix("_s"), f"{seconds:.2f}")
    console.print(table)
    if encoding.is_random_weights:
        randoms = [name for name, info in encoding.meta["models"].items() if info["is_random_init"]]
        console.print(
            f"[yellow]random weights ({', '.join(randoms)}): these features and latents are not real"
        )
    console.print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")
