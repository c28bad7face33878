"""A build config at the paper's sizes for one GPU node: real-size models with random weights, the recipes'
defaults (`lh` 150 views, `input` 8, `relight` 12 x 16, 512^2, 16 samples), render children and encoder
actors sharing the GPU.

    python benchmarks/gpu_node/paper_config.py --assets ../shared/assets --out /tmp/paper --render-slots 12
    python benchmarks/build.py --config /tmp/paper/build.yaml --keep --out build_h100.json

Random weights change no timing: the models have the released architectures (DINOv2 ViT-L/14 with registers,
the SLAT encoder and the 600M-parameter flow model), and nothing can be downloaded on the machines this runs on.
"""

import argparse
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from encoders.dinov2 import save_random_dinov2  # noqa: E402
from encoders.slat_encoder import SlatEncoderConfig, build_random_slat_encoder, save_slat_encoder  # noqa: E402
from encoders.slat_flow import SlatFlowConfig, build_random_slat_flow, save_slat_flow  # noqa: E402


def write_models(folder: Path, seed: int = 0) -> dict[str, str]:
    models = {"dinov2": folder / "dinov2", "slat_encoder": folder / "slat_encoder.safetensors",
              "slat_flow": folder / "slat_flow.safetensors"}
    if not models["dinov2"].exists():
        save_random_dinov2(models["dinov2"], seed=seed)
    if not models["slat_encoder"].exists():
        save_slat_encoder(build_random_slat_encoder(SlatEncoderConfig(), seed=seed), models["slat_encoder"])
    if not models["slat_flow"].exists():
        save_slat_flow(build_random_slat_flow(SlatFlowConfig(), seed=seed), models["slat_flow"])
    return {name: str(path) for name, path in models.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", type=Path, required=True, help="folder of asset files (searched recursively)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--render-slots", type=int, default=12, help="render children sharing the GPU")
    parser.add_argument("--encoder-gpu-share", type=float, default=0.1, help="of all encoder actors together")
    parser.add_argument("--encoders", type=int, default=2,
                        help="encoder actors on the GPU (one kept up with 12 render children only just: Z_s sampling)")
    parser.add_argument("--gpu-backend", choices=("opengl", "vulkan"), default="vulkan")
    parser.add_argument("--lh-samples", type=int, default=None, help="default: the lh recipe's")
    parser.add_argument("--release", default="paper-h100")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    render_share = round((1.0 - args.encoder_gpu_share) / args.render_slots, 4)
    encoder_share = round(args.encoder_gpu_share / args.encoders, 4)
    lh = {} if args.lh_samples is None else {"samples": args.lh_samples}
    config = {
        "data_root": str(args.out / "data"),
        "source": {"kind": "local", "path": str(args.assets.resolve()), "pattern": "**/*"},
        "recipes": {"lh": lh, "input": {}, "relight": {}},
        "models": write_models(args.out / "models"),
        "release": {"name": args.release},
        "execution": {
            "render_slots": args.render_slots, "render_gpus": render_share, "encoder_gpus": encoder_share,
            "encoders_per_node": args.encoders,
            "gpu_backend": args.gpu_backend, "max_in_flight": 2 * args.render_slots,
            "scratch_dir": str(args.out / "scratch"),
        },
    }
    path = args.out / "build.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    print(path)


if __name__ == "__main__":
    main()
