"""The container image in infra/container/, checked offline (no builder, no network).

The Dockerfile makes both environments with infra/setup.sh, ships every GL/EGL/Vulkan/X library that
benchmarks/gpu_node/pack.sh ships to bare GPU nodes, asks the NVIDIA toolkit for `graphics` (without it EGL
silently falls back to Mesa, cluster_and_storage.md section 3) and runs as a non-root user with the main env
on PATH. The scripts parse, and the smoke test passes only options the `near` commands have. Each checker
returns its problems, and the broken variants below show that it refuses them.
"""

import fnmatch
import json
import re
import shlex
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import click
import pytest

from pipelines.cli import cli

ROOT = Path(__file__).resolve().parents[2]
CONTAINER = ROOT / "infra" / "container"
DOCKERFILE = CONTAINER / "Dockerfile"
PACK_SH = ROOT / "benchmarks" / "gpu_node" / "pack.sh"
EGL_VENDOR_FILE = "/usr/share/glvnd/egl_vendor.d/10_nvidia.json"
VULKAN_ICD_FILE = "/etc/vulkan/icd.d/nvidia_icd.json"
"""The paths the toolkit mounts the host's copies to in legacy mode (cluster_and_storage.md section 3)."""
NVIDIA_SONAMES = {EGL_VENDOR_FILE: "libEGL_nvidia.so.0", VULKAN_ICD_FILE: "libGLX_nvidia.so.0"}
SETUP_INPUTS = ("pyproject.toml", "README.md", "infra/setup.sh", "infra/render-requirements.txt")
"""What infra/setup.sh reads besides the packages (pyproject names README.md as the readme)."""


# --- reading the files -------------------------------------------------------------------------------------------

def _logical_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined and comment lines dropped (Dockerfile and shell alike)."""
    lines, current = [], ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#"):
            continue
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        current += raw
        if current.strip():
            lines.append(current.strip())
        current = ""
    return lines


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, in order."""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
            for line in _logical_lines(text)]


def _apt_installed(instructions: list[tuple[str, str]]) -> set[str]:
    """Packages every `apt-get install` of the RUN instructions names."""
    packages: set[str] = set()
    for op, args in instructions:
        if op != "RUN":
            continue
        for command in args.split("&&"):
            if "apt-get install" not in command:
                continue
            words = shlex.split(command)
            if words[:2] == ["apt-get", "install"]:
                packages |= {w for w in words[2:] if not w.startswith("-")}
    return packages


def _pack_sh_gl_packages() -> set[str]:
    """The Debian packages pack.sh downloads for a bare GPU node (its `apt-get ... download` command)."""
    (line,) = [ln for ln in _logical_lines(PACK_SH.read_text()) if "apt-get" in ln and " download " in ln]
    words = shlex.split(line.split(" download ", 1)[1])
    packages = set()
    for word in words:
        if word.startswith("-"):
            continue
        if not re.fullmatch(r"[a-z0-9][a-z0-9.+-]+", word):  # `2>/dev/null)`: the command ends
            break
        packages.add(word)
    return packages


def _env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for op, args in instructions:
        if op == "ENV":
            env.update(word.split("=", 1) for word in shlex.split(args))
    return env


def _written_json_files(instructions: list[tuple[str, str]]) -> dict[str, dict]:
    """Files a RUN writes as `printf '%s\\n' 'JSON' > PATH`, parsed."""
    files = {}
    for op, args in instructions:
        if op == "RUN":
            for content, path in re.findall(r"printf '%s\\n' '(\{.*?\})'\s*>\s*(\S+)", args):
                files[path] = json.loads(content)
    return files


def _setup_run_index(instructions: list[tuple[str, str]]) -> int | None:
    for i, (op, args) in enumerate(instructions):
        if op == "RUN" and re.search(r"\bbash infra/setup\.sh\b", args):
            return i
    return None


def _copied_before(instructions: list[tuple[str, str]], index: int) -> list[str]:
    """Source paths of the COPY instructions before `index` (flags dropped)."""
    sources = []
    for op, args in instructions[:index]:
        if op == "COPY":
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            sources += words[:-1]
    return sources


def _is_copied(path: str, sources: list[str]) -> bool:
    for source in sources:
        if source in (".", "./"):
            return True
        if fnmatch.fnmatch(path, source) or path.startswith(source.rstrip("/") + "/"):
            return True
    return False


def _top_level_packages() -> list[str]:
    """The top-level packages pyproject's `packages.find.include` names (each a folder with __init__.py)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted({p.rstrip("*").rstrip(".") for p in patterns})


# --- the checkers ------------------------------------------------------------------------------------------------

def check_dockerfile(text: str) -> list[str]:
    """What the image must do; returns the problems found."""
    problems = []
    instructions = _instructions(text)
    ops = [op for op, _ in instructions]
    if "FROM" not in ops:
        return ["no FROM"]
    first_from = ops.index("FROM")
    if instructions[first_from][1].split()[0] not in ("${BASE}", "$BASE"):
        problems.append("FROM must take the base from ARG BASE (a local rootfs here, a CUDA base elsewhere)")
    if not any(op == "ARG" and args.startswith("BASE=") for op, args in instructions[:first_from]):
        problems.append("ARG BASE=... (with a default) must come before FROM")

    setup = _setup_run_index(instructions)
    if setup is None:
        problems.append("no RUN of `bash infra/setup.sh`: the environments must come from the README's setup")
    else:
        sources = _copied_before(instructions, setup)
        for needed in SETUP_INPUTS + ("render_jobs/worker.py",):  # setup.sh imports render_jobs (render env)
            if not _is_copied(needed, sources):
                problems.append(f"{needed} is not copied before setup.sh runs")
        for package in _top_level_packages():  # the editable install maps the top-level packages it finds
            if not _is_copied(f"{package}/__init__.py", sources):
                problems.append(f"{package}/__init__.py is not copied before setup.sh (editable install)")
    after_setup = instructions[(setup or 0):]
    if not any(op == "COPY" and shlex.split(args)[-2:] == [".", "."] for op, args in after_setup):
        problems.append("the whole checkout is not copied (COPY . .) after setup.sh")

    packages = _apt_installed(instructions)
    for missing in sorted(_pack_sh_gl_packages() - packages):
        problems.append(f"GL/EGL/Vulkan/X library {missing} (gpu_node/pack.sh ships it) is not installed")
    for needed in ("python3.11", "python3.11-venv"):  # setup.sh's NEAR_PYTHON; bpy 5.0.1 needs CPython 3.11
        if needed not in packages:
            problems.append(f"{needed} is not installed")

    env = _env(instructions)
    capabilities = set(env.get("NVIDIA_DRIVER_CAPABILITIES", "").split(","))
    if not ({"graphics", "compute", "utility"} <= capabilities or "all" in capabilities):
        problems.append("NVIDIA_DRIVER_CAPABILITIES must include graphics,compute,utility (or all): "
                        f"got {env.get('NVIDIA_DRIVER_CAPABILITIES')!r}")
    workdirs = [args for op, args in instructions if op == "WORKDIR"]
    main_bin = str(PurePosixPath(workdirs[-1]) / ".venv" / "bin") if workdirs else None
    if main_bin is None or main_bin not in env.get("PATH", "").split(":"):
        problems.append(f"PATH must hold the main env's bin ({main_bin}) so `near` works")

    users = [args.split(":")[0] for op, args in instructions if op == "USER"]
    if not users or users[-1] in ("root", "0"):
        problems.append(f"the image must run as a non-root USER, got {users[-1] if users else 'none'}")
    elif setup is not None and not any(op == "USER" for op, _ in instructions[:setup]):
        problems.append("setup.sh runs as root: the environments would not belong to the image's user")

    written = _written_json_files(instructions)
    for path, soname in NVIDIA_SONAMES.items():
        if path not in written:
            problems.append(f"{path} is not written")
        elif written[path].get("ICD", {}).get("library_path") != soname:
            problems.append(f"{path} must name {soname}, names {written[path].get('ICD')}")
    if not any(op in ("CMD", "ENTRYPOINT") for op in ops):
        problems.append("no CMD or ENTRYPOINT")
    return problems


def check_smoke_options(text: str) -> list[str]:
    """Every option smoke.sh passes to a `near` command is one that command has."""
    def options(command: click.Command) -> set[str]:
        return {opt for param in command.params for opt in param.opts if opt.startswith("--")}

    def command(*names: str) -> click.Command:  # through get_command: the CLI loads some commands lazily
        group: click.Command = cli
        for name in names:
            group = group.get_command(click.Context(group), name)
        return group

    known = {"render": options(command("render")), "encode": options(command("encode")),
             "build": options(command("build")),
             "catalog": options(command("catalog")) | options(command("catalog", "verify"))}
    problems, used = [], set()
    for line in _logical_lines(text):
        arrays = re.match(r"(render_args|soft)=\((.*)\)", line)
        try:
            words = shlex.split(arrays.group(2) if arrays else line, comments=True)
        except ValueError as err:  # quotes nested in $(...): not a line that runs near directly
            if "$near" in line:
                problems.append(f"cannot read {line!r}: {err}")
            continue
        runs = "render" if arrays else None
        if not arrays:
            for i, word in enumerate(words[:-1]):
                if word == "$near" and words[i + 1] in known:
                    runs = words[i + 1]
        if runs is None:
            continue
        used.add(runs)
        for word in words:
            option = word.split("=", 1)[0]
            if option.startswith("--") and option not in known[runs]:
                problems.append(f"near {runs} has no option {option}")
    for command in ("render", "encode", "build", "catalog"):
        if command not in used:
            problems.append(f"smoke.sh never runs `near {command}`")
    if not re.search(r"--gpu-backend opengl", text) or not re.search(r"--gpu-backend vulkan", text):
        problems.append("smoke.sh must render through both GPU backends (opengl, vulkan)")
    return problems


# --- the files as they are ---------------------------------------------------------------------------------------

def test_pack_sh_list_is_read() -> None:
    packages = _pack_sh_gl_packages()
    assert {"libvulkan1", "libegl1", "libglvnd0", "libice6"} <= packages and len(packages) > 15, packages


def test_dockerfile_meets_the_gpu_render_nodes() -> None:
    assert check_dockerfile(DOCKERFILE.read_text()) == []


def test_smoke_passes_only_options_near_has() -> None:
    assert check_smoke_options((CONTAINER / "smoke.sh").read_text()) == []


@pytest.mark.parametrize("script", ["smoke.sh", "build.sh"])
def test_scripts_parse_and_fail_loudly(script: str) -> None:
    text = (CONTAINER / script).read_text()
    assert "set -euo pipefail" in text
    result = subprocess.run(["bash", "-n", str(CONTAINER / script)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr


def test_dockerignore_keeps_envs_and_data_out_but_not_the_sources() -> None:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]

    def ignored(path: str) -> bool:  # docker's rule for these patterns: the path or a parent folder matches
        parts = PurePosixPath(path).parts
        for i, name in enumerate(parts):
            prefix = "/".join(parts[: i + 1])
            for pattern in patterns:
                if pattern.startswith("**/") and fnmatch.fnmatch(name, pattern[3:]):
                    return True
                if prefix.count("/") == pattern.count("/") and fnmatch.fnmatch(prefix, pattern):
                    return True
        return False

    for path in (".venv/bin/python", ".venv-render/bin/python", ".git/HEAD", ".gpu-node/parts/gl.00",
                 "near-demo/data/catalog.db", "render_jobs/__pycache__/worker.cpython-311.pyc"):
        assert ignored(path), path
    for path in SETUP_INPUTS + ("render_jobs/worker.py", "infra/container/smoke.sh", "pipelines/cli.py"):
        assert not ignored(path), path


# --- broken variants are refused ---------------------------------------------------------------------------------

BROKEN_DOCKERFILES: dict[str, Callable[[str], str]] = {
    "no graphics": lambda t: t.replace("NVIDIA_DRIVER_CAPABILITIES=graphics,compute,utility",
                                       "NVIDIA_DRIVER_CAPABILITIES=compute,utility"),
    "runs as root": lambda t: t + "\nUSER root\n",
    "a GL library missing": lambda t: t.replace(" libxxf86vm1 ", " "),
    "no setup.sh": lambda t: t.replace("bash infra/setup.sh", "bash infra/other.sh"),
    "a package unmapped": lambda t: t.replace("COPY --chown=near:near training/__init__.py training/\n", ""),
    "main env off PATH": lambda t: t.replace("PATH=/opt/near-factory/.venv/bin:$PATH", "PATH=$PATH"),
    "fixed base": lambda t: t.replace("FROM ${BASE}", "FROM debian:bookworm-slim"),
    "no EGL vendor file": lambda t: t.replace("libEGL_nvidia.so.0", "libEGL_mesa.so.0"),
}


@pytest.mark.parametrize("name", sorted(BROKEN_DOCKERFILES))
def test_broken_dockerfile_is_refused(name: str) -> None:
    text = DOCKERFILE.read_text()
    broken = BROKEN_DOCKERFILES[name](text)
    assert broken != text, f"the mutation {name!r} no longer applies to the Dockerfile"
    assert check_dockerfile(broken), name


@pytest.mark.parametrize("old, new", [("--gpu-backend vulkan", "--gpu-backend metal"),
                                      ("--resolution 64", "--size 64"),
                                      ("--slat-encoder", "--slat-encoder-path")])
def test_broken_smoke_is_refused(old: str, new: str) -> None:
    text = (CONTAINER / "smoke.sh").read_text()
    assert old in text
    assert check_smoke_options(text.replace(old, new))
