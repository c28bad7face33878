"""Stage 2 training on one worker (of one or several, under DDP): the whole decoder stack from scratch, AdamW
with linear warmup then cosine decay, bf16 autocast on CUDA, EMA, checkpoints that resume exactly, TensorBoard
scalars and image grids, and validation PSNR / SSIM / LPIPS on AgX-tone-mapped renders.

Random draws of step s (backgrounds) come from a generator seeded by (seed, s, rank), and the data order is a
function of (manifest, seed, epoch), so a resumed run reproduces the uninterrupted one.
"""

import hashlib
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from catalogs.release_reader import Release
from pipelines.steps import ENV_MAPS
from training.run import (
    META_FILE,
    RunFolder,
    check_release_pin,
    release_pin,
    step_batches,
    step_generator,
    train_loop,
)
from training.stage2.agx import AgX
from training.stage2.config import Stage2Config
from training.stage2.data import Stage2Data
from training.stage2.env_map_store import EnvMapStore
from training.stage2.losses import Stage2Target, stage2_losses, tone_mapped
from training.stage2.lpips import Lpips
from training.stage2.model import Stage2Inputs, Stage2Model, Stage2Render

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "trainer.pt"


def warmup_cosine(step: int, *, warmup: int, total: int) -> float:
    """Learning-rate factor: linear from 0 to 1 over `warmup` steps, then a cosine down to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class Stage2Trainer:
    def __init__(
        self, config: Stage2Config, *, device: torch.device, rank: int = 0, world_size: int = 1
    ) -> None:
        self.config, self.device, self.rank, self.world_size = config, device, rank, world_size
        self.run_folder = RunFolder(config.out_dir, rank)
        self.release = Release.open(config.data_root, config.release, config.release_sha256)
        # the maps the release packs (configured folders stand in only for a release that packs none)
        self.env_maps = EnvMapStore.from_release(
            self.release, config.model.tokenizer.map_size, folders=config.env_maps
        )
        held_out = {self.env_maps.digest_of(name) for name in config.held_out_env_maps}
        held_out |= set(self.release.info.get("held_out_env_maps", {}).values())  # the release's, for eval
        self.train_data = Stage2Data(
            self.release, "train", self.env_maps, with_bc_slat=config.model.decoder.with_bc_slat,
            without_env_maps=held_out, frames_per_asset=config.frames_per_asset,
        )  # fmt: skip
        self.normalization = self.train_data.normalization
        self.val_sets: dict[
            str, Stage2Data
        ] = {}  # "split": the validation split; "held_out_env": held-out maps
        if self.release.split(config.val_split):
            self.val_sets["split"] = self._data(config.val_split, without_env_maps=held_out)
        if held_out:
            self.val_sets["held_out_env"] = self._data("train", only_env_maps=held_out)

        self.model = Stage2Model(config.model).to(device)
        self.network: torch.nn.Module = self.model
        if world_size > 1:
            self.network = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.autocast = device.type == "cuda" and config.precision in ("auto", "bfloat16")
        self.agx = AgX.from_simple_ocio().to(device)
        self.lpips = self._lpips()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: warmup_cosine(step, warmup=config.warmup_steps, total=config.steps)
        )
        self.ema = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        self.step = 0
        self.writer = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(Path(config.out_dir) / "tensorboard")
        latest = self.run_folder.latest_checkpoint()
        if latest is not None:
            self.load_checkpoint(latest)

    def _data(self, split: str, **selection: Any) -> Stage2Data:
        return Stage2Data(
            self.release, split, self.env_maps, with_bc_slat=self.config.model.decoder.with_bc_slat,
            normalization=self.normalization, **selection,
        )  # fmt: skip

    def _lpips(self) -> Lpips | None:
        if self.config.losses.lpips == 0:
            return None
        if self.config.lpips_vgg is None:
            logger.warning(
                "no lpips_vgg weights configured: the LPIPS loss is off (weight 0) and not reported"
            )
            return None
        return Lpips.from_files(self.config.lpips_vgg).to(self.device)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # -- the objective ------------------------------------------------------------------------------------------

    def render(self, inputs: Stage2Inputs, *, network: torch.nn.Module | None = None) -> Stage2Render:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            return (network or self.network)(inputs)

    def train_step(self, batch: tuple[Stage2Inputs, Stage2Target] | None = None) -> dict[str, float]:
        """One optimizer step on this step's batch (read here unless a prefetching loader passes it)."""
        inputs, target = batch or step_batches(self)[self.step]
        inputs, target = inputs.to(self.device), target.to(self.device)
        render = self.render(inputs)
        losses = stage2_losses(
            render, target, agx=self.agx, lpips=self.lpips, weights=self.config.losses,
            generator=step_generator(self.config.seed, self.step, self.rank, "background"),
        )  # fmt: skip
        self.optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                self.ema[name].lerp_(p.detach(), 1 - self.config.ema_decay)
        self.step += 1
        values = {name: value.item() for name, value in losses.items()}
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"train/{name}", value, self.step)
            self.writer.add_scalar("train/grad_norm", float(grad_norm), self.step)
            self.writer.add_scalar("train/lr", self.scheduler.get_last_lr()[0], self.step)
            if self.step % self.config.image_every == 0:
                self.writer.add_image(
                    "train/grid", image_grid(self.agx, render, target), self.step, dataformats="HWC"
                )
        return values

    # -- evaluation ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, data: Stage2Data, indices: list[int], batch_size: int = 4) -> dict[str, float]:
        """PSNR, SSIM (and LPIPS when its weights are configured) of AgX-tone-mapped renders on black against
        the factory's renders, averaged over the given frames."""
        totals: dict[str, float] = {}
        for start in range(0, len(indices), batch_size):
            inputs, target = data.read(indices[start : start + batch_size])
            inputs, target = inputs.to(self.device), target.to(self.device)
            render = self.render(inputs, network=self.model)
            black = torch.zeros(len(indices[start : start + batch_size]), 1, 1, 1, device=self.device)
            predicted = tone_mapped(self.agx, render.radiance.float(), render.alpha.float(), black)
            expected = tone_mapped(self.agx, target.radiance, target.alpha, black)
            scores = {
                "psnr": peak_signal_noise_ratio(
                    predicted, expected, data_range=1.0, reduction="none", dim=(1, 2, 3)
                ),
                "ssim": structural_similarity_index_measure(
                    predicted, expected, data_range=1.0, reduction="none"
                ),
            }
            if self.lpips is not None:
                scores["lpips"] = self.lpips(predicted, expected)
            for name, values in scores.items():
                totals[name] = totals.get(name, 0.0) + float(values.sum())
        return {name: total / len(indices) for name, total in totals.items()}

    def validate(self) -> dict[str, float]:
        metrics = {}
        for name, data in self.val_sets.items():
            count = min(self.config.val_samples, len(data))
            indices = torch.linspace(0, len(data) - 1, count).round().long().tolist()  # spread over assets
            for metric, value in self.evaluate(data, indices).items():
                metrics[metric if name == "split" else f"{name}_{metric}"] = value
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(f"val/{name}", value, self.step)
        return metrics

    # -- the loop -----------------------------------------------------------------------------------------------

    def run(self, report: Callable[[dict[str, Any]], None] = lambda metrics: None) -> dict[str, Any]:
        """Train up to `config.steps`, validating, checkpointing and reporting on the way."""

        def metrics(batch: tuple[Stage2Inputs, Stage2Target]) -> dict[str, float]:
            losses = self.train_step(batch)
            return {"loss": losses.pop("total"), **{f"loss_{k}": v for k, v in losses.items()}}

        return train_loop(self, "stage2", metrics, report)

    # -- checkpoints --------------------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes `checkpoints/step-N/`: weights, EMA, optimizer and schedule, and metadata with the
        release pin, the latent normalisation and the environment maps trained on."""
        return self.run_folder.write_checkpoint(self.step, self._write_checkpoint)

    def _write_checkpoint(self, folder: Path) -> dict[str, Any]:
        weights = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        safetensors.torch.save_file(weights, folder / MODEL_FILE)
        safetensors.torch.save_file({k: v.cpu().contiguous() for k, v in self.ema.items()}, folder / EMA_FILE)
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }
        torch.save(state, folder / STATE_FILE)
        used = sorted({frame.env_map for frame in self.train_data.frames})
        return {
            "step": self.step,
            "config": self.config.to_dict(),
            "release": release_pin(self.release),
            "normalization": {role: {"mean": n.mean, "std": n.std} for role, n in self.normalization.items()},
            ENV_MAPS: {digest: self.env_maps.name_of(digest) for digest in used},  # sha256 -> file name
            "model_sha256": hashlib.sha256((folder / MODEL_FILE).read_bytes()).hexdigest(),
            "parameters": self.num_parameters,
        }

    def load_checkpoint(self, folder: Path) -> None:
        check_release_pin(folder, json.loads((folder / META_FILE).read_text()), self.release)
        self.model.load_state_dict(safetensors.torch.load_file(folder / MODEL_FILE, device=str(self.device)))
        self.ema = safetensors.torch.load_file(folder / EMA_FILE, device=str(self.device))
        state = torch.load(folder / STATE_FILE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        logger.info("resumed stage 2 from %s (step %d)", folder, self.step)


def image_grid(agx: AgX, render: Stage2Render, target: Stage2Target, samples: int = 4) -> Tensor:
    """(samples * H, 10 * W, 3) in [0, 1]: per sample a row of prediction | truth pairs: AgX-tone-mapped
    radiance, base colour, roughness, metallic and shadow."""

    def gray(x: Tensor) -> Tensor:
        return x.expand(*x.shape[:-1], 3)

    rows = []
    for s in range(min(samples, render.alpha.shape[0])):
        pairs = [
            (agx(render.radiance[s : s + 1].float())[0], agx(target.radiance[s : s + 1])[0]),
            (render.base_color[s], target.base_color[s]),
            (gray(render.roughness[s]), gray(target.roughness[s])),
            (gray(render.metallic[s]), gray(target.metallic[s])),
            (gray(render.shadow[s]), gray(target.shadow[s] * target.alpha[s])),
        ]
        rows.append(torch.cat([torch.cat([p.float(), t.float()], dim=1) for p, t in pairs], dim=1))
    return torch.cat(rows, dim=0).clamp(0, 1).detach().cpu()
