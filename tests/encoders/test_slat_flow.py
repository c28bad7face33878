"""The SLAT flow model: release state dict and file size, strict loading, backends, batching; the sampler."""

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from encoders.flow_sampler import FlowSamplerConfig, sample_flow, time_grid
from encoders.slat_flow import (
    SlatFlowConfig,
    SlatFlowModel,
    build_random_slat_flow,
    load_slat_flow,
    save_slat_flow,
)
from encoders.sparse import SparseTensor
from encoders.sparse_conv import SubmanifoldConv3d, VoxelGrid
from encoders.weights import state_dict_digest
from infra.errors import ConfigError
from tests.encoders.helpers import random_coords, shell_coords

REFERENCE = (
    Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "trellis_flow_state_dict.txt"
)
TINY = SlatFlowConfig(
    resolution=32, model_channels=48, cond_channels=24, num_blocks=2, num_heads=3, io_block_channels=(16,)
)
RELEASE_ARGS = {
    "resolution": 64, "in_channels": 8, "out_channels": 8, "model_channels": 1024, "cond_channels": 1024,
    "num_blocks": 24, "num_heads": 16, "mlp_ratio": 4, "patch_size": 2, "num_io_res_blocks": 2,
    "io_block_channels": [128], "pe_mode": "ape", "qk_rms_norm": True, "use_fp16": True,
}  # fmt: skip


def flow_input(
    radii: list[float], config: SlatFlowConfig, *, seed: int
) -> tuple[SparseTensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    coords = shell_coords(radii, grid=config.resolution)
    x = SparseTensor(coords, torch.randn(len(coords), config.in_channels, generator=generator))
    t = torch.rand(len(radii), generator=generator) * 1000
    cond = torch.randn(len(radii), 7, config.cond_channels, generator=generator)
    return x, t, cond


def velocity(model: SlatFlowModel, x: SparseTensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x, t, cond).feats


@pytest.fixture(scope="module")
def tiny_fp32() -> SlatFlowModel:
    return build_random_slat_flow(TINY.replace(use_fp16=False), seed=1).eval()


def test_state_dict_matches_the_release() -> None:
    if not REFERENCE.exists():
        pytest.skip(f"no reference list at {REFERENCE}")
    expected = [line.split("\t") for line in REFERENCE.read_text().splitlines() if line.strip()]
    with torch.device("meta"):
        state_dict = SlatFlowModel(SlatFlowConfig()).state_dict()
    actual = [
        [name, str(tuple(t.shape)), str(t.dtype).removeprefix("torch.")] for name, t in state_dict.items()
    ]
    assert actual == expected
    assert sum(t.numel() for t in state_dict.values()) == 600_432_520


@pytest.mark.slow
def test_release_file_has_the_published_size_and_loads_back_with_identical_outputs(tmp_path: Path) -> None:
    path = tmp_path / "ckpts" / "slat_flow_img_dit_L_64l8p2_fp16.safetensors"
    original = build_random_slat_flow(SlatFlowConfig(), seed=0)
    save_slat_flow(original, path)
    assert path.stat().st_size == 1_203_755_136
    assert json.loads(path.with_suffix(".json").read_text()) == {
        "name": "SLatFlowModel",
        "args": RELEASE_ARGS,
    }

    model, info = load_slat_flow(str(path.with_suffix("")))  # TRELLIS's pipeline.json names it without suffix
    assert model.config == SlatFlowConfig() and model.torso_dtype == torch.float32
    assert info.digest == state_dict_digest(safetensors.torch.load_file(path)) and info.is_random_init
    original.to_torso_dtype(torch.float32).eval()  # the fp16 weights, computed in fp32 as the CPU load does
    x, t, cond = flow_input([6.0, 4.0], SlatFlowConfig(), seed=2)
    cond = torch.randn(2, 1374, 1024)
    out = velocity(model, x, t, cond)
    assert out.shape == (len(x.coords), 8) and out.std() > 1e-3
    assert torch.equal(out, velocity(original, x, t, cond))
    del original, model


def test_tiny_model_round_trips_through_its_files_and_the_hub(tmp_path: Path, hub_cache) -> None:
    path = tmp_path / "ckpts" / "tiny.safetensors"
    original = build_random_slat_flow(TINY, seed=3)
    save_slat_flow(original, path)
    loaded, info = load_slat_flow(str(path))
    assert loaded.config == TINY and not any(p.requires_grad for p in loaded.parameters())
    hub_cache.publish("owner/repo", path.parent, path_in_repo="ckpts")
    from_hub, hub_info = load_slat_flow("owner/repo/ckpts/tiny")
    assert hub_info.digest == info.digest and from_hub.config == TINY
    x, t, cond = flow_input([9.0, 5.0], TINY, seed=4)
    torch.testing.assert_close(velocity(loaded, x, t, cond), velocity(from_hub, x, t, cond), rtol=0, atol=0)


def test_mismatched_checkpoint_names_the_tensor(tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    save_slat_flow(build_random_slat_flow(TINY, seed=3), path)
    tensors = safetensors.torch.load_file(path)
    tensors["input_layer.weight"] = tensors["input_layer.weight"][:, :4].contiguous()
    safetensors.torch.save_file(tensors, path)
    with pytest.raises(ConfigError, match=r"input_layer.weight \(16, 4\)"):
        load_slat_flow(str(path))
    config = path.with_suffix(".json")
    config.write_text(json.dumps({"name": "SLatFlowModel", "args": {**RELEASE_ARGS, "pe_mode": "rope"}}))
    with pytest.raises(ConfigError, match="pe_mode='ape'"):
        load_slat_flow(str(path))


def test_spconv_and_torch_convolutions_agree(tiny_fp32: SlatFlowModel) -> None:
    """The pure-torch gather convolution (the GPU path without spconv's CUDA wheel) against spconv's kernel,
    alone on random weights and inside the model; same weight layout, no conversion."""
    coords = shell_coords([7.0, 11.0], grid=32)
    grid = VoxelGrid(coords, 32)
    assert (grid.neighbor_index < len(coords)).sum(1).float().mean() > 8  # a surface: neighbours are active
    spconv_conv = SubmanifoldConv3d(5, 6, backend="spconv")
    torch.nn.init.normal_(spconv_conv.conv.weight)
    torch.nn.init.normal_(spconv_conv.conv.bias)
    torch_conv = SubmanifoldConv3d(5, 6, backend="torch")
    torch_conv.load_state_dict(spconv_conv.state_dict())
    feats = torch.randn(len(coords), 5)
    with torch.no_grad():
        torch.testing.assert_close(torch_conv(feats, grid), spconv_conv(feats, grid), rtol=1e-5, atol=1e-5)

    torch_model = SlatFlowModel(TINY.replace(use_fp16=False, conv_backend="torch")).eval()
    torch_model.load_state_dict(tiny_fp32.state_dict())
    spconv_model = SlatFlowModel(TINY.replace(use_fp16=False, conv_backend="spconv")).eval()
    spconv_model.load_state_dict(tiny_fp32.state_dict())
    x, t, cond = flow_input([9.0, 5.0], TINY, seed=5)
    expected = velocity(spconv_model, x, t, cond)
    assert expected.std() > 1e-3
    torch.testing.assert_close(velocity(torch_model, x, t, cond), expected, rtol=1e-5, atol=1e-5)


def test_spconv_refuses_to_train_on_the_cpu() -> None:
    conv = SubmanifoldConv3d(2, 2, backend="spconv")
    grid = VoxelGrid(shell_coords([3.0], grid=8), 8)
    with pytest.raises(ConfigError, match="no backward pass"):
        conv(torch.zeros(len(grid.coords), 2), grid)


def test_objects_are_processed_independently(tiny_fp32: SlatFlowModel) -> None:
    """One object's velocity does not depend on the others in the batch, nor on its voxels' row order."""
    x, t, cond = flow_input([9.0, 5.0], TINY, seed=6)
    both = velocity(tiny_fp32, x, t, cond)
    first = x.coords[:, 0] == 0
    alone = velocity(tiny_fp32, SparseTensor(x.coords[first], x.feats[first]), t[:1], cond[:1])
    torch.testing.assert_close(alone, both[first], rtol=1e-5, atol=1e-5)
    order = torch.randperm(int(first.sum()), generator=torch.Generator().manual_seed(0))
    permuted = velocity(
        tiny_fp32, SparseTensor(x.coords[first][order], x.feats[first][order]), t[:1], cond[:1]
    )
    torch.testing.assert_close(permuted, alone[order], rtol=1e-5, atol=1e-5)


def test_condition_time_and_input_all_matter(tiny_fp32: SlatFlowModel) -> None:
    x, t, cond = flow_input([9.0], TINY, seed=7)
    base = velocity(tiny_fp32, x, t, cond)
    for changed in (velocity(tiny_fp32, x, t + 100, cond), velocity(tiny_fp32, x, t, torch.zeros_like(cond)),
                    velocity(tiny_fp32, x.replace(feats=x.feats + 1), t, cond)):  # fmt: skip
        assert (changed - base).abs().max() > 1e-4


def test_invalid_inputs_are_rejected(tiny_fp32: SlatFlowModel) -> None:
    x, t, cond = flow_input([5.0, 4.0], TINY, seed=8)
    with pytest.raises(ValueError, match="feature channels"):
        tiny_fp32(x.replace(feats=x.feats[:, :3]), t, cond)
    with pytest.raises(ValueError, match="one time and one condition per object"):
        tiny_fp32(x, t[:1], cond[:1])
    with pytest.raises(ValueError, match=r"voxel coords must lie in \[0, 32\)"):
        tiny_fp32(SparseTensor(random_coords([4], grid=40, seed=0) + torch.tensor([0, 32, 0, 0], dtype=torch.int32),
                               torch.zeros(4, 8)), t[:1], cond[:1])  # fmt: skip
    with pytest.raises(ConfigError, match="patch_size"):
        SlatFlowConfig(patch_size=4)


def test_time_grid_is_warped_toward_noise() -> None:
    plain = time_grid(FlowSamplerConfig(steps=4, rescale_t=1.0))
    assert plain == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    warped = time_grid(FlowSamplerConfig(steps=4, rescale_t=3.0))
    assert warped[0] == 1.0 and warped[-1] == 0.0 and warped[2] == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))


def test_euler_sampler_follows_a_straight_flow_exactly() -> None:
    """For x_t = (1 - t) x0 + t eps the velocity (x_t - x0) / t is constant along the path, so Euler lands on
    x0 whatever the steps; guidance mixes (1 + w) v(cond) - w v(zeros) inside its interval only."""
    coords = shell_coords([3.0], grid=8)
    target = torch.randn(len(coords), 8)
    calls = []

    def denoiser(x: SparseTensor, t: torch.Tensor, cond: torch.Tensor) -> SparseTensor:
        calls.append((float(t[0]) / 1000, bool(cond.any())))
        return x.replace(feats=(x.feats - target * cond.abs().amax()) / (t[0] / 1000))

    noise = SparseTensor(coords, torch.randn(len(coords), 8))
    cond = torch.ones(1, 4, 2)
    out = sample_flow(denoiser, noise, cond, FlowSamplerConfig(steps=3, rescale_t=2.0, cfg_strength=0.0))
    torch.testing.assert_close(out.feats, target, rtol=1e-5, atol=1e-5)
    calls.clear()
    config = FlowSamplerConfig(steps=4, rescale_t=1.0, cfg_strength=2.0, cfg_interval=(0.5, 1.0))
    sample_flow(denoiser, noise, cond, config)
    assert [c for c in calls if not c[1]] == [(1.0, False), (0.75, False), (0.5, False)]
    # guided at the last step: x - t ((1 + w) (x - target) / t - w x / t) = (1 + w) target
    always = FlowSamplerConfig(steps=4, rescale_t=1.0, cfg_strength=2.0, cfg_interval=(0.0, 1.0))
    torch.testing.assert_close(sample_flow(denoiser, noise, cond, always).feats, 3 * target)


def test_gather_convolution_gradients_equal_autograd_through_its_gathers() -> None:
    """The custom backward (a mirrored-kernel gather convolution, no scatter) against autograd's own."""
    from encoders.sparse_conv import _gather_conv

    grid = VoxelGrid(shell_coords([5.0, 3.0], grid=16), 16)
    generator = torch.Generator().manual_seed(0)
    feats = torch.randn(len(grid.coords), 5, dtype=torch.float64, generator=generator, requires_grad=True)
    conv = SubmanifoldConv3d(5, 6, backend="torch").double()
    torch.nn.init.normal_(conv.conv.weight, generator=generator)
    upstream = torch.randn(len(grid.coords), 6, dtype=torch.float64, generator=generator)
    custom = torch.autograd.grad((conv(feats, grid) * upstream).sum(), [feats, *conv.parameters()])
    plain = _gather_conv(feats, conv.conv.weight, conv.conv.bias, grid.neighbor_index)
    reference = torch.autograd.grad((plain * upstream).sum(), [feats, *conv.parameters()])
    for mine, theirs in zip(custom, reference, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_forward_and_backward_match_the_cpu(tiny_fp32: SlatFlowModel) -> None:
    """The GPU path (pure-torch gather convolution unless spconv's CUDA wheel is there, varlen flash attention
    in bf16) against the CPU path (spconv's kernel for the forward), on the same weights."""
    x, t, cond = flow_input([9.0, 5.0], TINY, seed=9)
    expected = velocity(tiny_fp32, x, t, cond)
    gpu = SlatFlowModel(TINY.replace(use_fp16=False)).cuda().eval()
    gpu.load_state_dict(tiny_fp32.state_dict())
    x_gpu = SparseTensor(x.coords.cuda(), x.feats.cuda())
    torch.testing.assert_close(
        velocity(gpu, x_gpu, t.cuda(), cond.cuda()).cpu(), expected, rtol=1e-4, atol=1e-4
    )
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = velocity(gpu.to_torso_dtype(torch.bfloat16), x_gpu, t.cuda(), cond.cuda()).float().cpu()
    assert ((bf16 - expected).norm() / expected.norm()).item() < 0.03

    def input_gradient(model: SlatFlowModel, device: str) -> torch.Tensor:
        feats = x.feats.to(device).requires_grad_(True)
        out = model(SparseTensor(x.coords.to(device), feats), t.to(device), cond.to(device)).feats
        return torch.autograd.grad(out.square().sum(), feats)[0].cpu()

    cpu_torch = SlatFlowModel(TINY.replace(use_fp16=False, conv_backend="torch")).eval()
    cpu_torch.load_state_dict(tiny_fp32.state_dict())
    gpu.to_torso_dtype(torch.float32).load_state_dict(tiny_fp32.state_dict())  # undo the bf16 rounding
    torch.testing.assert_close(
        input_gradient(gpu, "cuda"), input_gradient(cpu_torch, "cpu"), rtol=1e-3, atol=1e-4
    )
