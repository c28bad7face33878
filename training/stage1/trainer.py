"""Stage 1 training on one worker (of one or several, under DDP): TRELLIS's rectified-flow objective on the
widened, LoRA-adapted flow model, EMA, checkpoints that resume exactly, TensorBoard logs and validation.

Every random draw of step s comes from a generator seeded by (seed, s, rank) and the data order is a function
of (manifest, seed, epoch), so a resumed run reproduces the losses of an uninterrupted one.
"""

import copy
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from torch import Tensor

from catalogs.release_reader import Release
from encoders.dinov2 import Dinov2Config, Dinov2Features
from encoders.flow_sampler import sample_flow
from encoders.slat_flow import SlatFlowModel, load_slat_flow
from encoders.sparse import SparseTensor
from infra.errors import ConfigError
from training.run import (
    META_FILE,
    RunFolder,
    check_release_pin,
    release_pin,
    step_batches,
    step_generator,
    train_loop,
)
from training.stage1.config import Stage1Config
from training.stage1.data import Stage1Batch, Stage1Data
from training.stage1.model import stage1_model, velocity
from training.stage1.objective import rectified_flow_loss

logger = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "trainer.pt"


class Stage1Trainer:
    def __init__(
        self, config: Stage1Config, *, device: torch.device, rank: int = 0, world_size: int = 1
    ) -> None:
        self.config, self.device, self.rank, self.world_size = config, device, rank, world_size
        self.out_dir = Path(config.out_dir)
        self.run_folder = RunFolder(config.out_dir, rank)
        self.release = Release.open(config.data_root, config.release, config.release_sha256)
        self.train_data = Stage1Data(self.release, "train")
        self.normalization = self.train_data.normalization
        has_val = bool(self.release.split(config.val_split))
        self.val_data = Stage1Data(self.release, config.val_split, self.normalization) if has_val else None

        flow, self.base_weights = load_slat_flow(config.base_model, device=torch.device("cpu"))
        self.autocast = device.type == "cuda" and config.precision in ("auto", "bfloat16")
        if self.autocast:
            flow.to_torso_dtype(torch.bfloat16)  # frozen base in bf16; adapters stay float32 masters
        if config.gradient_checkpointing:
            flow.gradient_checkpointing = True
        self.model = stage1_model(flow, config.lora).to(device)
        self.dinov2 = Dinov2Features(Dinov2Config(model=config.dinov2), device=device)
        self.trainable = {name: p for name, p in self.model.named_parameters() if p.requires_grad}
        self.network = self.model
        if world_size > 1:
            self.network = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.optimizer = torch.optim.AdamW(
            self.trainable.values(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.ema = {name: p.detach().clone() for name, p in self.trainable.items()}
        self.step = 0
        self.writer = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(self.out_dir / "tensorboard")
        self._resume_if_possible()

    @property
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable.values())

    # -- the objective ------------------------------------------------------------------------------------------

    def flow_loss(self, batch: Stage1Batch, generator: torch.Generator, *, network: Any = None) -> Tensor:
        cond = self.dinov2.condition(batch.images).clone()  # clone: out of inference mode, usable in autograd
        config = self.config
        return rectified_flow_loss(
            network or self.network,
            batch.lh,
            batch.shaded,
            cond,
            generator,
            t_mean=config.t_mean,
            t_std=config.t_std,
            sigma_min=config.sigma_min,
            p_uncond=config.p_uncond,
            autocast=self.autocast,
        )

    def train_step(self, batch: Stage1Batch | None = None) -> float:
        """One optimizer step on this step's batch (read here unless a prefetching loader passes it)."""
        batch = (batch or step_batches(self)[self.step]).to(self.device)
        loss = self.flow_loss(batch, self._generator("train"))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable.values(), max_norm=1.0)
        self.optimizer.step()
        with torch.no_grad():
            decay = self.config.ema_decay
            for name, p in self.trainable.items():
                self.ema[name].lerp_(p.detach(), 1 - decay)
        self.step += 1
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss.item(), self.step)
            self.writer.add_scalar("train/grad_norm", float(grad_norm), self.step)
        return loss.item()

    def _generator(self, purpose: str) -> torch.Generator:
        return step_generator(self.config.seed, self.step, self.rank, purpose)

    # -- evaluation ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, data: Stage1Data, indices: list[int]) -> dict[str, float]:
        """Flow loss, and the MSE (normalised latents) of sampled LH-SLATs against the truth next to that of
        the Z_s baseline (Z_s taken as the answer), over the given (asset, view) items."""
        generator = torch.Generator().manual_seed(self.config.seed)
        batch = data.batch(indices).to(self.device)
        flow_loss = self.flow_loss(batch, generator, network=self.model).item()
        cond = self.dinov2.condition(batch.images).clone()
        noise = torch.randn(batch.lh.feats.shape, generator=generator).to(self.device)

        def denoiser(x: SparseTensor, t: Tensor, c: Tensor) -> SparseTensor:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                v = velocity(self.model, x, batch.shaded, t, c)
            return v.replace(feats=v.feats.float())

        sampled = sample_flow(denoiser, batch.lh.replace(feats=noise), cond, self.config.sampler).feats
        return {
            "flow_loss": flow_loss,
            "mse_sampled": F.mse_loss(sampled, batch.lh.feats).item(),
            "mse_shaded_baseline": F.mse_loss(batch.shaded, batch.lh.feats).item(),
        }

    def validate(self) -> dict[str, float]:
        if self.val_data is None:
            return {}
        count = min(self.config.val_samples, len(self.val_data))
        metrics = self.evaluate(self.val_data, list(range(count)))
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(f"val/{name}", value, self.step)
        return metrics

    # -- the loop -----------------------------------------------------------------------------------------------

    def run(self, report: Callable[[dict[str, Any]], None] = lambda metrics: None) -> dict[str, Any]:
        """Train up to `config.steps`, validating, checkpointing and reporting on the way."""
        return train_loop(self, "stage1", lambda batch: {"loss": self.train_step(batch)}, report)

    # -- checkpoints --------------------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes `checkpoints/step-N/`: adapter and widened input layer, EMA, optimizer, and metadata
        with the release pin."""
        return self.run_folder.write_checkpoint(self.step, self._write_checkpoint)

    def _write_checkpoint(self, folder: Path) -> dict[str, Any]:
        adapter = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(self.model).items()}
        safetensors.torch.save_file(adapter, folder / ADAPTER_FILE)
        safetensors.torch.save_file({k: v.cpu().contiguous() for k, v in self.ema.items()}, folder / EMA_FILE)
        torch.save({"step": self.step, "optimizer": self.optimizer.state_dict()}, folder / STATE_FILE)
        return {
            "step": self.step,
            "config": self.config.to_dict(),
            "release": release_pin(self.release),
            "base_model": {"reference": self.base_weights.reference, "digest": self.base_weights.digest},
            "dinov2": {"reference": self.dinov2.weights.reference, "digest": self.dinov2.weights.digest},
            "normalization": {"mean": self.normalization.mean, "std": self.normalization.std},
            "lora": {**self.config.lora.to_dict(), "use_rslora": True, "modules_to_save": ["input_layer"]},
            "adapter_sha256": hashlib.sha256((folder / ADAPTER_FILE).read_bytes()).hexdigest(),
            "trainable_parameters": self.num_trainable,
        }

    def _resume_if_possible(self) -> None:
        latest = self.run_folder.latest_checkpoint()
        if latest is not None:
            self.load_checkpoint(latest)

    def load_checkpoint(self, folder: Path) -> None:
        check_release_pin(folder, json.loads((folder / META_FILE).read_text()), self.release)
        adapter = safetensors.torch.load_file(folder / ADAPTER_FILE, device=str(self.device))
        result = set_peft_model_state_dict(self.model, adapter)
        if result.unexpected_keys:
            raise ConfigError(f"{folder}: unexpected adapter tensors {result.unexpected_keys}")
        ema = safetensors.torch.load_file(folder / EMA_FILE, device=str(self.device))
        self.ema = {name: ema[name] for name in self.trainable}
        state = torch.load(folder / STATE_FILE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        logger.info("resumed stage 1 from %s (step %d)", folder, self.step)

    def merged_model(self) -> SlatFlowModel:
        """A plain flow model (16 input channels) with the adapters merged in, for inference and export."""
        return copy.deepcopy(self.model).merge_and_unload()
