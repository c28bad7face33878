"""Stage 2 building blocks: the rasterizer (torch reference, and gsplat against it on a GPU), the Gaussian
heads, the lighting tokenizer at paper size, LPIPS and the losses."""

import dataclasses
import math

import pytest
import torch

from training.stage2.agx import AgX
from training.stage2.gaussians import GaussianHeadsConfig, IntrinsicHead, camera_normals
from training.stage2.lighting_tokenizer import LightingTokenizer, LightingTokenizerConfig
from training.stage2.losses import LossWeights, Stage2Target, stage2_losses
from training.stage2.lpips import Lpips
from training.stage2.model import Stage2Render
from training.stage2.rasterizer import Camera, Splats, rasterize

SIZE = 32
FOCAL = 40.0


def _camera(device: str = "cpu") -> Camera:
    """At the origin looking down +z (OpenCV), 32 x 32 pixels."""
    K = torch.tensor([[FOCAL, 0.0, SIZE / 2], [0.0, FOCAL, SIZE / 2], [0.0, 0.0, 1.0]], device=device)
    return Camera(w2c=torch.eye(4, device=device), K=K, width=SIZE, height=SIZE)


def _splats(means, scales, opacities, features) -> Splats:
    means = torch.as_tensor(means, dtype=torch.float32)
    quats = torch.zeros(len(means), 4)
    quats[:, 0] = 1
    return Splats(means, quats, torch.as_tensor(scales, dtype=torch.float32),
                  torch.as_tensor(opacities, dtype=torch.float32), torch.as_tensor(features, dtype=torch.float32))  # fmt: skip


def random_scene(count: int, seed: int, channels: int = 9, device: str = "cpu") -> Splats:
    generator = torch.Generator().manual_seed(seed)
    means = torch.rand(count, 3, generator=generator) * torch.tensor([1.0, 1.0, 1.0]) - torch.tensor(
        [0.5, 0.5, -1.5]
    )
    quats = torch.randn(count, 4, generator=generator)
    scales = torch.exp(torch.rand(count, 3, generator=generator) * 2.5 - 5.0)  # 7e-3 .. 8e-2
    opacities = torch.rand(count, generator=generator) * 0.98 + 0.01
    features = torch.rand(count, channels, generator=generator) * 4
    return Splats(*(t.to(device) for t in (means, quats, scales, opacities, features)))


def test_one_gaussian_is_the_projected_ewa_footprint() -> None:
    depth, sigma_world, opacity = 2.0, 0.05, 0.8
    splats = _splats([[0.0, 0.0, depth]], [[sigma_world] * 3], [opacity], [[1.0, 2.0]])
    image, alpha = rasterize(splats, _camera(), backend="torch")
    variance_px = (FOCAL * sigma_world / depth) ** 2 + 0.3  # EWA projection plus eps2d
    for x, y in ((16, 16), (18, 16), (16, 13)):
        d2 = (x + 0.5 - SIZE / 2) ** 2 + (y + 0.5 - SIZE / 2) ** 2
        expected = opacity * math.exp(-0.5 * d2 / variance_px)
        assert alpha[y, x, 0].item() == pytest.approx(expected, rel=1e-5)
        assert image[y, x].tolist() == pytest.approx([expected, 2 * expected], rel=1e-5)
    assert alpha[0, 0, 0].item() == 0.0  # far outside: below 1/255, skipped


def test_the_nearer_gaussian_occludes_whatever_the_input_order() -> None:
    far = ([0.0, 0.0, 3.0], [0.2] * 3, 0.99, [0.0, 1.0])
    near = ([0.0, 0.0, 2.0], [0.2] * 3, 0.99, [1.0, 0.0])
    for order in ((far, near), (near, far)):
        splats = _splats(*(list(x) for x in zip(*order)))
        image, alpha = rasterize(splats, _camera(), backend="torch")
        centre = image[16, 16]
        assert (
            centre[0] > 0.95 and centre[1] < 0.05
        )  # the near one's ~0.97, what shows through of the far one
        assert alpha[16, 16, 0] > 0.99
    behind = _splats([[0.0, 0.0, -1.0]], [[0.2] * 3], [0.9], [[1.0, 1.0]])
    assert rasterize(behind, _camera(), backend="torch")[1].abs().sum() == 0  # behind the camera: culled


def test_torch_rasterizer_gives_gradients_to_every_attribute() -> None:
    splats = random_scene(64, seed=0, channels=3)
    leaves = [
        t.requires_grad_()
        for t in (splats.means, splats.quats, splats.scales, splats.opacities, splats.features)
    ]
    image, alpha = rasterize(splats, _camera(), backend="torch")
    (image.sum() + alpha.sum()).backward()
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0


def test_gsplat_needs_cuda_and_says_so() -> None:
    from infra.errors import ConfigError

    with pytest.raises(ConfigError, match="needs CUDA tensors"):
        rasterize(random_scene(4, seed=0), _camera(), backend="gsplat")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gsplat_and_the_torch_reference_agree_on_random_scenes() -> None:
    """Acceptance: the two backends within 1e-3 on random scenes (features up to 4, so relative ~2.5e-4)."""
    worst = 0.0
    for seed in range(8):
        splats = random_scene(400, seed=seed, device="cuda")
        camera = _camera("cuda")
        gsplat_image, gsplat_alpha = rasterize(splats, camera, backend="gsplat")
        torch_image, torch_alpha = rasterize(splats, camera, backend="torch")
        error = max(
            (gsplat_image - torch_image).abs().max().item(), (gsplat_alpha - torch_alpha).abs().max().item()
        )
        worst = max(worst, error)
    print(f"gsplat vs torch reference: max |difference| {worst:.2e} over 8 scenes of 400 Gaussians")
    assert worst < 1e-3


def test_heads_start_from_trellis_like_gaussians_and_normals_face_the_camera() -> None:
    config = GaussianHeadsConfig(gaussians_per_voxel=8)
    head = IntrinsicHead(16, config)
    coords = torch.tensor([[0, 0, 0], [31, 40, 63]])
    gaussians = head(torch.randn(2, 16), coords)
    voxel_centres = (coords.float() + 0.5) / 64 - 0.5
    assert (gaussians.centres - voxel_centres[:, None]).abs().max() <= 0.5 / 64 + 1e-6  # inside the voxel
    assert torch.allclose(gaussians.opacities, torch.full((2, 8), 0.1))
    assert torch.allclose(gaussians.scales, torch.full((2, 8, 3), 4e-3))
    assert torch.allclose(gaussians.quats, torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(2, 8, 4))
    w2c = torch.eye(4)
    w2c[2, 3] = 2.0  # the object 2 units in front of an OpenCV camera
    normals = camera_normals(gaussians, w2c)  # OpenGL camera space: towards the camera is +z
    position = (gaussians.centres + torch.tensor([0.0, 0.0, 2.0])) * torch.tensor([1.0, -1.0, -1.0])
    assert ((normals * position).sum(-1) <= 0).all()


def test_paper_size_lighting_tokenizer_gives_4096_tokens_of_768() -> None:
    config = LightingTokenizerConfig()
    tokenizer = LightingTokenizer(config).eval()
    maps = torch.rand(1, 3, *config.map_size)
    with torch.no_grad():
        tokens = tokenizer(
            maps, maps, torch.nn.functional.normalize(torch.randn(1, 3, *config.map_size), dim=1)
        )
    assert tokens.shape == (1, 4096, 768) == (1, config.num_tokens, config.width)
    assert torch.isfinite(tokens).all()


def test_lpips_is_zero_on_equal_images_and_differentiable() -> None:
    lpips = Lpips.random(seed=0)
    x = torch.rand(2, 3, 64, 64)
    y = torch.rand(2, 3, 64, 64, requires_grad=True)
    assert lpips(x, x).abs().max() == 0
    distance = lpips(x, y)
    distance.sum().backward()
    assert distance.shape == (2,) and (distance > 0).all()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def test_lpips_loads_a_torchvision_vgg16_checkpoint_and_refuses_a_missing_one(tmp_path) -> None:
    reference = Lpips.random(seed=1)
    trunk = {f"features.{k}": v for k, v in reference.features.state_dict().items()}
    trunk["classifier.0.weight"] = torch.zeros(2, 2)  # a full torchvision checkpoint has more than the trunk
    torch.save(trunk, tmp_path / "vgg16.pth")
    loaded = Lpips.from_files(tmp_path / "vgg16.pth")
    x, y = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    assert torch.equal(loaded(x, y), reference(x, y))
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        Lpips.from_files(tmp_path / "absent.pth")


def test_losses_have_the_paper_weights_and_vanish_on_a_perfect_render() -> None:
    generator = torch.Generator().manual_seed(0)
    alpha = (torch.rand(2, 32, 32, 1, generator=generator) > 0.5).float()
    target = Stage2Target(
        radiance=torch.rand(2, 32, 32, 3, generator=generator) * 5 * alpha,
        alpha=alpha,
        base_color=torch.rand(2, 32, 32, 3, generator=generator),
        roughness=torch.rand(2, 32, 32, 1, generator=generator),
        metallic=torch.rand(2, 32, 32, 1, generator=generator),
        shadow=torch.rand(2, 32, 32, 1, generator=generator),
        shadow_valid=torch.ones(2),
    )
    perfect = Stage2Render(
        radiance=target.radiance, base_color=target.base_color, roughness=target.roughness,
        metallic=target.metallic, shadow=target.shadow * alpha, alpha=alpha,
        scales=torch.zeros(5, 3), opacities=torch.ones(5),
    )  # fmt: skip
    weights = LossWeights()
    assert (weights.pbr, weights.shadow, weights.volume, weights.opacity) == (0.3, 0.5, 1e4, 1e-3)
    losses = stage2_losses(perfect, target, agx=AgX.from_simple_ocio(), lpips=Lpips.random(), weights=weights)
    assert set(losses) == {"log_l1", "ssim", "lpips", "pbr", "shadow", "volume", "opacity", "total"}
    assert losses["total"].abs() < 1e-4
    worse = Stage2Render(
        **{**perfect.__dict__, "radiance": perfect.radiance * 2, "shadow": perfect.shadow * 0}
    )
    losses = stage2_losses(worse, target, agx=AgX.from_simple_ocio(), lpips=None, weights=weights)
    assert "lpips" not in losses
    assert losses["log_l1"] > 0 and losses["shadow"] == pytest.approx(
        0.5 * (target.shadow * alpha).mean().item()
    )
    # a frame without a shadow-casting light has no shadow target: its error does not count
    unlit = dataclasses.replace(target, shadow_valid=torch.tensor([1.0, 0.0]))
    losses = stage2_losses(worse, unlit, agx=AgX.from_simple_ocio(), lpips=None, weights=weights)
    assert losses["shadow"] == pytest.approx(0.5 * (target.shadow * alpha)[0].mean().item())
    none_lit = dataclasses.replace(target, shadow_valid=torch.zeros(2))
    assert stage2_losses(worse, none_lit, agx=AgX.from_simple_ocio(), lpips=None, weights=weights)["shadow"] == 0
