"""Environment-map encodings: a one-bright-texel map puts its light where DESIGN's convention says, in camera
space, also after a yaw rotation, which changes E_dir alone."""

import math

import pytest
import torch

from training.stage2.envmap import LOG_NORMALIZER, encode_env_map, yaw_matrix

HEIGHT, WIDTH = 64, 128


def bright_texel_map(direction: torch.Tensor) -> torch.Tensor:
    """A black map with one texel of 1000 where DESIGN's formula sends `direction` (world, Z up)."""
    x, y, z = direction.tolist()
    u, v = 0.5 - math.atan2(y, x) / (2 * math.pi), math.acos(z) / math.pi
    hdr = torch.zeros(HEIGHT, WIDTH, 3)
    hdr[min(int(v * HEIGHT), HEIGHT - 1), int(u * WIDTH) % WIDTH] = 1000.0
    return hdr


def brightest_direction(encoding) -> torch.Tensor:
    flat = encoding.log[0].flatten().argmax()
    return encoding.direction.flatten(1)[:, flat]


def look_at_c2w(position: torch.Tensor) -> torch.Tensor:
    """Blender/OpenGL camera at `position` looking at the origin, +Z up."""
    forward = -position / position.norm()
    right = torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0]))
    right = right / right.norm()
    up = torch.linalg.cross(right, forward)
    c2w = torch.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, -forward, position
    return c2w


LIGHT = torch.tensor([math.cos(0.3) * math.cos(0.6), math.sin(0.3) * math.cos(0.6), math.sin(0.6)])
TEXEL_RAD = 2 * math.pi / WIDTH


@pytest.mark.parametrize("yaw", [0.0, 1.2, -2.5])
def test_bright_texel_direction_in_camera_space(yaw: float) -> None:
    c2w = look_at_c2w(torch.tensor([0.0, -2.0, 0.5]))
    encoding = encode_env_map(bright_texel_map(LIGHT), yaw_rad=yaw, c2w=c2w)
    expected = c2w[:3, :3].t() @ (yaw_matrix(yaw) @ LIGHT)  # world light turned by the yaw, into the camera
    angle = torch.arccos(torch.dot(brightest_direction(encoding), expected).clamp(-1, 1))
    assert angle < 1.5 * TEXEL_RAD
    assert torch.allclose(encoding.direction.norm(dim=0), torch.ones(HEIGHT, WIDTH), atol=1e-5)


def test_a_light_straight_ahead_of_the_camera_is_minus_z() -> None:
    c2w = look_at_c2w(torch.tensor([3.0, 0.0, 0.0]))  # looks down -X
    encoding = encode_env_map(bright_texel_map(torch.tensor([-1.0, 0.0, 0.0])), yaw_rad=0.0, c2w=c2w)
    direction = brightest_direction(encoding)
    assert direction[2] < -0.99  # OpenGL camera: forward is -Z


def test_yaw_changes_only_the_directions() -> None:
    hdr = torch.rand(HEIGHT, WIDTH, 3, generator=torch.Generator().manual_seed(0)) * 50
    c2w = look_at_c2w(torch.tensor([1.0, 1.0, 1.0]))
    a, b = encode_env_map(hdr, yaw_rad=0.0, c2w=c2w), encode_env_map(hdr, yaw_rad=0.7, c2w=c2w)
    assert torch.equal(a.ldr, b.ldr) and torch.equal(a.log, b.log)
    assert not torch.allclose(a.direction, b.direction, atol=1e-3)
    assert 0.0 <= float(a.ldr.min()) and float(a.ldr.max()) <= 1.0
    assert float(a.log.max()) <= math.log1p(50) / LOG_NORMALIZER + 1e-6
