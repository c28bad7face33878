"""Stage 2's fast paths against the plain paths they replace: batched cross-attention, the batched rasterizer,
and `ViewRenderer` (cached intrinsic pass and map features, CUDA graph) give the same renders, losses and
gradients. On the CPU with the torch reference rasterizer in float32; on a GPU with gsplat in bf16."""

import dataclasses

import pytest
import torch
from torch import Tensor

from encoders.sparse import SparseTensor
from pipelines.demo import DEMO_STAGE2_MODEL
from tests.training.test_stage2_parts import random_scene
from training.stage2.agx import AgX
from training.stage2.losses import LossWeights, Stage2Target, stage2_losses
from training.stage2.model import (
    Stage2Inputs,
    Stage2Model,
    Stage2ModelConfig,
    Stage2Render,
    ViewRenderer,
    ViewRendererConfig,
)
from training.stage2.rasterizer import Camera, Splats, rasterize

IMAGES = ("radiance", "base_color", "roughness", "metallic", "shadow", "alpha")
PLAIN = {"batched_cross_attention": False, "batched_rasterizer": False}


def _config(base: Stage2ModelConfig, *, batched_cross_attention: bool, batched_rasterizer: bool) -> Stage2ModelConfig:
    decoder = base.decoder.replace(batched_cross_attention=batched_cross_attention)
    return base.replace(decoder=decoder, batched_rasterizer=batched_rasterizer)


def _model(config: Stage2ModelConfig, device: str = "cpu") -> Stage2Model:
    """Random weights everywhere, the zero-initialised output layers too, so every path shows in the render."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Stage2Model(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith(("intrinsic_head.out_layer", "lighting_head.out_layer")):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.to(device)


def _inputs(config: Stage2ModelConfig, device: str = "cpu", size: int = 24) -> Stage2Inputs:
    """Two assets of different voxel counts in three samples: asset 0 twice (the training layout of
    frames_per_asset), asset 1 once; so the batched paths pad, and one asset's intrinsic pass serves two samples."""
    generator = torch.Generator().manual_seed(1)
    coords = []
    for asset, count in enumerate((40, 25)):
        xyz = torch.randperm(16**3, generator=generator)[:count]
        xyz = torch.stack([xyz // 256, xyz // 16 % 16, xyz % 16], dim=1) + 24  # near the grid's centre
        coords.append(torch.cat([torch.full((count, 1), asset), xyz], dim=1))
    coords = torch.cat(coords).int()
    w2c = torch.eye(4).repeat(3, 1, 1)
    w2c[:, 2, 3] = torch.tensor([0.6, 0.7, 0.65])  # the object 0.6-0.7 units in front of each OpenCV camera
    w2c[1, :3, :3] = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])  # seen from the side
    K = torch.tensor([[30.0, 0.0, size / 2], [0.0, 30.0, size / 2], [0.0, 0.0, 1.0]]).repeat(3, 1, 1)
    maps = torch.rand(3, 3, *config.tokenizer.map_size, generator=generator)
    directions = torch.nn.functional.normalize(torch.randn(3, 3, *config.tokenizer.map_size, generator=generator), dim=1)
    inputs = Stage2Inputs(
        slat=SparseTensor(coords, torch.randn(len(coords), config.decoder.input_channels, generator=generator)),
        sample_asset=torch.tensor([0, 1, 0]), w2c=w2c, K=K, env_ldr=maps, env_log=maps * 0.5, env_dir=directions,
        image_size=(size, size),
    )  # fmt: skip
    return inputs.to(torch.device(device))


def _target(render: Stage2Render) -> Stage2Target:
    generator = torch.Generator().manual_seed(2)
    shape = render.alpha.shape
    alpha = (torch.rand(shape, generator=generator) > 0.5).float().to(render.alpha.device)
    noise = torch.rand(*shape[:-1], 3, generator=generator).to(render.alpha.device)
    return Stage2Target(noise * alpha, alpha, noise, alpha, alpha, alpha, torch.ones(shape[0], device=alpha.device))


def _loss_and_gradients(model: Stage2Model, inputs: Stage2Inputs) -> tuple[Stage2Render, Tensor, dict[str, Tensor]]:
    render = model(inputs)
    losses = stage2_losses(render, _target(render), agx=AgX.from_simple_ocio(), lpips=None, weights=LossWeights(),
                           generator=torch.Generator().manual_seed(3))  # fmt: skip
    model.zero_grad()
    losses["total"].backward()
    return render, losses["total"].detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _padded(scenes: list[Splats], count: int) -> Splats:
    """The scenes as one batch, each padded with zeros (zero opacity) to `count` Gaussians."""
    def pad(x: Tensor) -> Tensor:
        return torch.cat([x, x.new_zeros(count - len(x), *x.shape[1:])])

    return Splats(*(torch.stack([pad(getattr(s, f.name)) for s in scenes]) for f in dataclasses.fields(Splats)))


def _assert_same_render(fast: Stage2Render, plain: Stage2Render, atol: float) -> None:
    for name in IMAGES + ("scales", "opacities"):
        a, b = getattr(fast, name).float(), getattr(plain, name).float()
        assert a.shape == b.shape, name
        assert torch.allclose(a, b, atol=atol, rtol=atol), f"{name}: max |difference| {(a - b).abs().max():.2e}"


@pytest.mark.parametrize("switch", ["batched_cross_attention", "batched_rasterizer"])
def test_each_fast_path_gives_the_plain_paths_render_loss_and_gradients(switch: str) -> None:
    base = Stage2ModelConfig.from_dict(DEMO_STAGE2_MODEL)
    plain = _model(_config(base, **PLAIN))
    fast = _model(_config(base, **{**PLAIN, switch: True}))
    inputs = _inputs(base)
    plain_render, plain_loss, plain_grads = _loss_and_gradients(plain, inputs)
    fast_render, fast_loss, fast_grads = _loss_and_gradients(fast, inputs)
    for s in range(3):  # every sample shows its object, and the two views of asset 0 differ
        assert 0.01 < plain_render.alpha[s].mean() < 0.95 and plain_render.radiance[s].std() > 0.01
    assert (plain_render.radiance[0] - plain_render.radiance[2]).abs().max() > 1e-3
    _assert_same_render(fast_render, plain_render, atol=1e-5)
    assert torch.allclose(fast_loss, plain_loss, rtol=1e-5)
    assert plain_grads.keys() == fast_grads.keys()
    for name, grad in plain_grads.items():
        assert torch.allclose(fast_grads[name], grad, rtol=1e-4, atol=1e-6), name
    assert any(grad.abs().sum() > 0 for name, grad in plain_grads.items() if name.startswith("lighting_decoder"))


@pytest.mark.parametrize("reuse_map_features", [True, False])
def test_view_renderer_gives_the_models_render(reuse_map_features: bool) -> None:
    """Decoded once, each map encoded once (or per call): every call renders what `forward` renders, one map
    seen by several cameras included."""
    config = Stage2ModelConfig.from_dict(DEMO_STAGE2_MODEL)
    model = _model(config).eval()
    inputs = _inputs(config)
    one_map = dataclasses.replace(inputs, env_ldr=inputs.env_ldr[:1].expand(3, -1, -1, -1),
                                  env_log=inputs.env_log[:1].expand(3, -1, -1, -1))  # fmt: skip
    with torch.no_grad():
        expected = model(one_map)
        renderer = ViewRenderer(
            model, inputs.slat, inputs.sample_asset, inputs.env_ldr[:1], inputs.env_log[:1],
            config=ViewRendererConfig(reuse_map_features=reuse_map_features),
        )  # fmt: skip
        for _ in range(2):  # the second call reuses what the first left
            rendered = renderer(inputs.w2c, inputs.K, inputs.env_dir, inputs.image_size)
            _assert_same_render(rendered, expected, atol=1e-5)
        other_view = renderer(inputs.w2c.flip(0), inputs.K, inputs.env_dir, inputs.image_size)
    assert (other_view.alpha - expected.alpha).abs().max() > 0.05


def test_zero_opacity_padding_leaves_the_batched_reference_image_unchanged() -> None:
    scenes = [random_scene(count, seed=seed) for seed, count in enumerate((120, 80))]
    K = torch.tensor([[40.0, 0.0, 16.0], [0.0, 40.0, 16.0], [0.0, 0.0, 1.0]])
    w2c = torch.eye(4).repeat(2, 1, 1)
    w2c[1, 0, 3] = 0.1
    padded = _padded(scenes, 160)
    padded.means[1, 80:] = torch.tensor([0.0, 0.0, 1.0])  # in front of the camera: only its opacity hides it
    padded.scales[1, 80:] = 0.2
    batch = rasterize(padded, Camera(w2c, K.expand(2, 3, 3), 32, 32), backend="torch")
    for s, scene in enumerate(scenes):
        image, alpha = rasterize(scene, Camera(w2c[s], K, 32, 32), backend="torch")
        assert alpha.max() > 0.5
        assert torch.allclose(batch[0][s], image, atol=1e-6) and torch.allclose(batch[1][s], alpha, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gsplat_batched_matches_one_call_per_camera_and_the_reference() -> None:
    scenes = [random_scene(count, seed=seed, device="cuda") for seed, count in enumerate((400, 300, 350))]
    K = torch.tensor([[40.0, 0.0, 16.0], [0.0, 40.0, 16.0], [0.0, 0.0, 1.0]], device="cuda")
    w2c = torch.eye(4, device="cuda").repeat(3, 1, 1)
    w2c[:, 0, 3] = torch.tensor([0.0, 0.1, -0.1], device="cuda")
    images, alphas = rasterize(_padded(scenes, 400), Camera(w2c, K.expand(3, 3, 3), 32, 32), backend="gsplat")
    for s, scene in enumerate(scenes):
        camera = Camera(w2c[s], K, 32, 32)
        for backend in ("gsplat", "torch"):
            image, alpha = rasterize(scene, camera, backend=backend)
            assert alpha.max() > 0.5
            assert (images[s] - image).abs().max() < 1e-3 and (alphas[s] - alpha).abs().max() < 1e-3, backend


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fast_paths_on_cuda_in_bf16_match_the_plain_path() -> None:
    """gsplat batched and per sample, batched attention, and `ViewRenderer`'s CUDA graph, under bf16 autocast."""
    base = Stage2ModelConfig.from_dict(DEMO_STAGE2_MODEL)
    plain = _model(_config(base, **PLAIN), "cuda").eval()
    fast = _model(_config(base, batched_cross_attention=True, batched_rasterizer=True), "cuda").eval()
    inputs = _inputs(base, "cuda", size=64)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        expected = plain(inputs)
        _assert_same_render(fast(inputs), expected, atol=2e-2)
        for cuda_graph in (False, True):
            renderer = ViewRenderer(
                fast, inputs.slat, inputs.sample_asset, inputs.env_ldr, inputs.env_log,
                config=ViewRendererConfig(cuda_graph=cuda_graph),
            )  # fmt: skip
            for _ in range(2):
                _assert_same_render(renderer(inputs.w2c, inputs.K, inputs.env_dir, inputs.image_size), expected, 2e-2)
    assert (expected.alpha.amax(dim=(1, 2, 3)) > 0.5).all()  # every sample drew something opaque
