"""The one config loader: every YAML config (build, stage 1, stage 2) refuses a bad value with a ConfigError
that names the key path and the value, and loads what is valid as before."""

import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.errors import ConfigError
from pipelines.build_config import BuildConfig
from training.stage1.config import Stage1Config
from training.stage2.config import Stage2Config


def _write(folder: Path, data: Any, name: str = "config.yaml") -> Path:
    path = folder / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _build(folder: Path, **sections: Any) -> Callable[[], BuildConfig]:
    path = _write(folder, {"data_root": "data", **sections})
    return lambda: BuildConfig.from_yaml(path)


def _stage(cls: type, folder: Path, **keys: Any) -> Callable[[], Any]:
    path = _write(folder, keys)
    return lambda: cls.from_yaml(path)


def _assert_refused(load: Callable[[], Any], key: str, value: Any) -> None:
    """`load` raises a ConfigError whose message names `key` (as a whole path) and then `value`."""
    with pytest.raises(ConfigError) as info:
        load()
    message = str(info.value)
    assert re.search(rf"(^|: ){re.escape(key)}: .*{re.escape(repr(value))}", message), message


@pytest.mark.parametrize(
    ("sections", "key", "value"),
    [
        ({"execution": {"max_in_flight": 0}}, "execution.max_in_flight", 0),
        ({"execution": {"commit_every": -64}}, "execution.commit_every", -64),
        ({"execution": {"render_timeout_s": 0}}, "execution.render_timeout_s", 0),
        ({"execution": {"commit_interval_s": -1.5}}, "execution.commit_interval_s", -1.5),
        ({"execution": {"render_gpus": -0.5}}, "execution.render_gpus", -0.5),
        ({"source": {"kind": "objaverse-xl", "download_processes": -1}}, "source.download_processes", -1),
        ({"source": {"kind": "objaverse-xl", "max_file_mb": 0}}, "source.max_file_mb", 0),
        ({"source": {"kind": "objaverse-xl", "limit": 0}}, "source.limit", 0),
        ({"recipes": {"lh": {"samples": 0}}}, "recipes.lh.samples", 0),
        ({"recipes": {"relight": {"resolution_px": -512}}}, "recipes.relight.resolution_px", -512),
        ({"recipes": {"input": {"fov_deg": 180}}}, "recipes.input.fov_deg", 180),
        ({"shaded": {"views": 0}}, "shaded.views", 0),
        ({"shaded": {"sampler": {"steps": 0}}}, "shaded.sampler.steps", 0),
        ({"release": {"max_voxels": 0}}, "release.max_voxels", 0),
    ],
)
def test_build_counts_sizes_and_timeouts_must_be_positive(tmp_path: Path, sections: dict, key: str, value):
    _assert_refused(_build(tmp_path, **sections), key, value)


@pytest.mark.parametrize("percent", [101, -5])
def test_build_percentages_lie_in_0_to_100(tmp_path: Path, percent: int) -> None:
    _assert_refused(_build(tmp_path, release={"val_percent": percent}), "release.val_percent", percent)
    _assert_refused(_build(tmp_path, release={"test_percent": percent}), "release.test_percent", percent)


def test_build_test_and_val_shares_fit_in_the_split_rule(tmp_path: Path) -> None:
    _assert_refused(_build(tmp_path, release={"val_percent": 60, "test_percent": 50}), "release.test_percent", 50)
    _assert_refused(_build(tmp_path, release={"test_percent": 0.915}), "release.test_percent", 0.915)


def test_build_min_voxels_may_not_exceed_max_voxels(tmp_path: Path) -> None:
    load = _build(tmp_path, release={"min_voxels": 4096, "max_voxels": 64})
    _assert_refused(load, "release.min_voxels", 4096)


@pytest.mark.parametrize(
    ("sections", "key", "value"),
    [
        ({"source": {"kind": "objaverse-xl", "file_types": "glb"}}, "source.file_types", "glb"),
        ({"source": {"kind": "objaverse-xl", "licenses": "CC-BY"}}, "source.licenses", "CC-BY"),
        ({"execution": {"max_in_flight": "8"}}, "execution.max_in_flight", "8"),
        ({"execution": {"allow_software_gl": "yes"}}, "execution.allow_software_gl", "yes"),
        ({"release": {"val_percent": [5]}}, "release.val_percent", [5]),
        ({"recipes": {"lh": {"samples": "16"}}}, "recipes.lh.samples", "16"),
        ({"recipes": {"lh": {"passes": "beauty"}}}, "recipes.lh.passes", "beauty"),
        ({"models": {"dinov2": 3}}, "models.dinov2", 3),
        ({"source": "local"}, "source", "local"),
        ({"recipes": ["lh"]}, "recipes", ["lh"]),
        ({"shaded": {"sampler": 25}}, "shaded.sampler", 25),
    ],
)
def test_build_values_of_the_wrong_type_are_named(tmp_path: Path, sections: dict, key: str, value: Any):
    _assert_refused(_build(tmp_path, **sections), key, value)


@pytest.mark.parametrize(
    ("sections", "key", "value"),
    [
        ({"source": {"kind": "ftp"}}, "source.kind", "ftp"),
        ({"execution": {"gpu_backend": "metal"}}, "execution.gpu_backend", "metal"),
        ({"recipes": {"lh": {"passes": ["depth"]}}}, "recipes.lh.passes", ("depth",)),
        ({"source": {"objaverse_sources": ["github", "ftp"]}}, "source.objaverse_sources", "ftp"),
    ],
)
def test_build_values_outside_their_choices_are_named(tmp_path: Path, sections: dict, key: str, value: Any):
    _assert_refused(_build(tmp_path, **sections), key, value)


@pytest.mark.parametrize(
    ("sections", "key", "value"),
    [
        ({"source": {"colour": "red"}}, "source.colour", "colour"),
        ({"recipes": {"sunset": {"samples": 4}}}, "recipes.sunset", "sunset"),
        ({"models": {"clip": "openai/clip"}}, "models.clip", "clip"),
        ({"colour": "red"}, "colour", "colour"),
    ],
)
def test_build_unknown_keys_are_named_with_their_path(tmp_path: Path, sections: dict, key: str, value: Any):
    _assert_refused(_build(tmp_path, **sections), key, value)


@pytest.mark.parametrize("text", ["- data_root\n- source\n", "42\n", "just a string\n"])
def test_every_config_file_must_hold_a_mapping(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, text)
    for load in (BuildConfig.from_yaml, Stage1Config.from_yaml, Stage2Config.from_yaml):
        with pytest.raises(ConfigError, match="mapping"):
            load(path)


def test_every_config_file_is_capped_in_size(tmp_path: Path) -> None:
    path = _write(tmp_path, "data_root: data\n" + "# padding\n" * 300_000)
    for load in (BuildConfig.from_yaml, Stage1Config.from_yaml, Stage2Config.from_yaml):
        with pytest.raises(ConfigError, match="MiB"):
            load(path)


def test_unreadable_config_files_are_config_errors(tmp_path: Path) -> None:
    """Passed before the shared loader too: kept for both readers it replaces."""
    broken = _write(tmp_path, "data_root: [unclosed\n")
    for load in (BuildConfig.from_yaml, Stage1Config.from_yaml, Stage2Config.from_yaml):
        for path in (broken, tmp_path / "missing.yaml"):
            with pytest.raises(ConfigError, match=re.escape(str(path))):
                load(path)


def test_a_local_source_folder_must_exist(tmp_path: Path) -> None:
    load = _build(tmp_path, source={"kind": "local", "path": "nowhere"})
    _assert_refused(load, "source.path", str(tmp_path / "nowhere"))


def test_an_ids_file_must_exist(tmp_path: Path) -> None:
    load = _build(tmp_path, source={"kind": "objaverse-xl", "ids_file": "curated.txt"})
    _assert_refused(load, "source.ids_file", str(tmp_path / "curated.txt"))


@pytest.mark.parametrize("name", ["../evil", ".hidden", "a/b", "/abs"])
def test_a_release_name_is_one_plain_name_at_config_load(tmp_path: Path, name: str) -> None:
    _assert_refused(_build(tmp_path, release={"name": name}), "release.name", name)
    for cls in (Stage1Config, Stage2Config):
        _assert_refused(_stage(cls, tmp_path, release=name), "release", name)


@pytest.mark.parametrize(
    ("cls", "keys", "key", "value"),
    [
        (Stage1Config, {"steps": 0}, "steps", 0),
        (Stage1Config, {"batch_size": -8}, "batch_size", -8),
        (Stage1Config, {"log_every": 0}, "log_every", 0),
        (Stage1Config, {"data_workers": -1}, "data_workers", -1),
        (Stage1Config, {"lr": -1e-4}, "lr", -1e-4),
        (Stage1Config, {"lora": {"rank": 0}}, "lora.rank", 0),
        (Stage1Config, {"p_uncond": 1.5}, "p_uncond", 1.5),
        (Stage1Config, {"sampler": {"steps": -3}}, "sampler.steps", -3),
        (Stage1Config, {"batch_size": 8, "num_workers": 3}, "batch_size", 8),
        (Stage1Config, {"sampler": {"cfg_interval": [0.8, 0.2]}}, "sampler.cfg_interval", (0.8, 0.2)),
        (Stage2Config, {"warmup_steps": -1}, "warmup_steps", -1),
        (Stage2Config, {"image_every": 0}, "image_every", 0),
        (Stage2Config, {"losses": {"ssim": -0.2}}, "losses.ssim", -0.2),
    ],
)
def test_training_counts_and_ranges_are_named(tmp_path: Path, cls: type, keys: dict, key: str, value: Any):
    _assert_refused(_stage(cls, tmp_path, **keys), key, value)


@pytest.mark.parametrize(
    ("cls", "keys", "key", "value"),
    [
        (Stage1Config, {"steps": "many"}, "steps", "many"),
        (Stage1Config, {"steps": None}, "steps", None),
        (Stage1Config, {"lr": "fast"}, "lr", "fast"),
        (Stage1Config, {"precision": "fp16"}, "precision", "fp16"),
        (Stage1Config, {"use_gpu": "no"}, "use_gpu", "no"),
        (Stage1Config, {"lora": {"targets": "to_q"}}, "lora.targets", "to_q"),
        (Stage1Config, {"lora": [16, 16.0]}, "lora", [16, 16.0]),
        (Stage1Config, {"sampler": {"cfg_interval": [0.5]}}, "sampler.cfg_interval", [0.5]),
        (Stage2Config, {"model": {"tokenizer": {"width": "big"}}}, "model.tokenizer.width", "big"),
        (Stage2Config, {"model": {"decoder": {"colour": 1}}}, "model.decoder.colour", "colour"),
        (Stage2Config, {"model": {"rasterizer": "cuda"}}, "model.rasterizer", "cuda"),
        (Stage2Config, {"losses": {"ssim": "high"}}, "losses.ssim", "high"),
        (Stage2Config, {"env_maps": "maps"}, "env_maps", "maps"),
        (Stage2Config, {"held_out_env_maps": "sunset.exr"}, "held_out_env_maps", "sunset.exr"),
        (Stage2Config, {"colour": "red"}, "colour", "colour"),
    ],
)
def test_training_values_of_the_wrong_type_are_named(tmp_path: Path, cls: type, keys: dict, key: str, value):
    _assert_refused(_stage(cls, tmp_path, **keys), key, value)


def test_a_nested_config_error_names_the_nested_config(tmp_path: Path) -> None:
    """A class that checks its own fields without naming them is still placed by its path."""
    load = _stage(Stage2Config, tmp_path, model={"decoder": {"model_channels": 50, "num_heads": 12}})
    _assert_refused(load, "model.decoder", 50)


def test_valid_configs_load_with_paths_made_absolute_beside_the_file(tmp_path: Path) -> None:
    (tmp_path / "assets").mkdir()
    (tmp_path / "ids.txt").write_text("abc\n")
    (tmp_path / "flow.safetensors").write_text("")
    build = _build(
        tmp_path,
        source={"kind": "objaverse-xl", "path": "assets", "ids_file": "ids.txt", "file_types": ["glb"]},
        recipes={"lh": {"samples": 4, "env_maps_dir": "maps"}, "relight": None},
        models={"slat_flow": "flow", "dinov2": "facebook/dinov2-with-registers-large"},
        shaded=None,
        release={"name": "lh-v1", "min_voxels": 64, "max_voxels": 64, "val_percent": 0},
        execution={"render_timeout_s": 30, "commit_interval_s": "1e1", "scratch_dir": "scratch"},
    )()
    assert build.data_root == str(tmp_path / "data")
    assert (build.source.path, build.source.ids_file) == (str(tmp_path / "assets"), str(tmp_path / "ids.txt"))
    assert build.source.file_types == ("glb",)
    assert (build.recipes["lh"].samples, build.recipes["lh"].num_views) == (4, 150)  # over lh's defaults
    assert build.recipes["lh"].env_maps_dir == str(tmp_path / "maps")
    assert build.recipes["relight"].lightings_per_view == 16
    assert build.slat_flow == str(tmp_path / "flow")
    assert build.dinov2 == "facebook/dinov2-with-registers-large"  # a hub id stays as written
    assert build.execution.render_timeout_s == 30.0 and isinstance(build.execution.render_timeout_s, float)
    assert build.execution.commit_interval_s == 10.0
    assert build.scratch_dir == tmp_path / "scratch"

    stage2 = _stage(Stage2Config, tmp_path, data_root="data", env_maps=["maps"], lr="1e-3", release="lh-v1",
                    losses={"opacity": "1e-3"}, model={"tokenizer": {"map_size": [32, 64]}})()  # fmt: skip
    assert (stage2.data_root, stage2.env_maps) == (str(tmp_path / "data"), (str(tmp_path / "maps"),))
    assert (stage2.lr, stage2.losses.opacity, stage2.model.tokenizer.map_size) == (1e-3, 1e-3, (32, 64))
    assert Stage2Config.from_dict(stage2.to_dict()) == stage2  # how Ray Train ships it to the workers


def test_command_line_overrides_replace_the_file_and_stay_relative_to_the_working_directory(tmp_path: Path):
    path = _write(tmp_path, {"out_dir": "runs", "steps": 10, "base_model": "flow.safetensors"})
    (tmp_path / "flow.safetensors").write_text("")
    config = Stage1Config.from_yaml(path, steps=5, out_dir="elsewhere", release="lh-v1", data_root=None)
    assert (config.steps, config.out_dir, config.release) == (5, "elsewhere", "lh-v1")
    assert config.base_model == str(tmp_path / "flow.safetensors")
    _assert_refused(lambda: Stage1Config.from_yaml(path, steps=0), "steps", 0)
    _assert_refused(lambda: Stage1Config.from_yaml(path, release="../evil"), "release", "../evil")


def test_the_demo_configs_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines import demo

    monkeypatch.setattr(demo, "write_demo_models", lambda folder, seed: {
        name: folder / name for name in ("dinov2", "slat_encoder", "slat_flow")
    })  # fmt: skip
    config = demo.DemoConfig()
    build = BuildConfig.from_yaml(config.write_build_config(tmp_path))
    assert (build.release.name, build.recipes["relight"].lightings_per_view) == ("demo-seed0", 2)
    assert Stage1Config.from_yaml(config.write_stage1_config(tmp_path)).lora.rank == 16
    assert Stage2Config.from_yaml(config.write_stage2_config(tmp_path)).model.tokenizer.width == 48


def test_a_config_error_with_its_key_survives_pickling() -> None:
    from infra.config import ConfigFieldError

    err = ConfigFieldError("execution.max_in_flight", "must be >= 1, got 0")
    back = pickle.loads(pickle.dumps(err))
    assert (back.key, back.detail, str(back)) == (err.key, err.detail, f"{err.key}: {err.detail}")
    assert isinstance(back, ConfigError)
