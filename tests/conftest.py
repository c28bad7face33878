"""Shared fixtures. Blender renders are expensive on a CPU (seconds per tiny frame), so every render a test
needs is made once per session here and shared."""

import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from jaxtyping import install_import_hook

install_import_hook(["encoders"], "beartype.beartype")  # runtime shape checks (STYLE rule 3), before any import


from infra.environments import find_render_python
from infra.errors import ConfigError
from pipelines.demo import generate_demo_assets
from pipelines.local_render import AssetRecord, render_files
from render_jobs.recipes import ALL_PASSES, recipe_config
from render_jobs.supervisor import RenderSupervisor, RenderWorkerConfig

SHARED_ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"


@pytest.fixture(scope="session")
def render_python() -> Path:
    try:
        return find_render_python()
    except ConfigError as err:
        pytest.skip(f"render env not available: {err}")


@pytest.fixture(scope="session")
def worker_config(render_python: Path) -> RenderWorkerConfig:
    return RenderWorkerConfig(render_python=str(render_python), allow_software_gl=True, timeout_s=600)


@pytest.fixture(scope="session")
def supervisor(worker_config: RenderWorkerConfig):
    with RenderSupervisor(worker_config) as sup:
        yield sup


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory, render_python: Path) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("demo_assets")
    paths = generate_demo_assets(out, seed=0, render_python=str(render_python))
    return {p.stem: p for p in paths}


@pytest.fixture(scope="session")
def demo_manifest(demo_assets: dict[str, Path]) -> dict:
    return json.loads((next(iter(demo_assets.values())).parent / "demo_assets.json").read_text())


def _render(paths, recipe, out, supervisor, worker_config) -> dict[str, AssetRecord]:
    records = list(render_files(paths, recipe, out, worker=worker_config, supervisor=supervisor))
    return {Path(r.path).stem: r for r in records}


@pytest.fixture(scope="session")
def demo_lh_renders(tmp_path_factory, demo_assets, supervisor, worker_config) -> dict[str, AssetRecord]:
    """The `lh` recipe with every pass on, 2 views at 128^2, for the physics and geometry tests."""
    recipe = recipe_config("lh", num_views=2, resolution_px=128, samples=4, passes=ALL_PASSES)
    names = ["diffuse_sphere", "textured_cube", "rough_cone", "open_box"]
    return _render([demo_assets[n] for n in names], recipe, tmp_path_factory.mktemp("lh"), supervisor, worker_config)


def _postgres_bindir() -> Path | None:
    """Where Debian's PostgreSQL server binaries are (`initdb` on PATH, or /usr/lib/postgresql/<major>/bin)."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL server on a loopback port, trust auth, fsync off (`.ci/run` installs Debian's
    package); yields its SQLAlchemy URI without a database. As root the server runs as the `postgres` user,
    since initdb refuses root."""
    bindir = _postgres_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries: apt-get install postgresql")
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="near-postgres-"))  # not under pytest's 0700 root folder
    if as_postgres:
        shutil.chown(folder, "postgres")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = folder / "data"
    subprocess.run([*as_postgres, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                    "--no-sync"], check=True, capture_output=True)
    subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w", "start",
                    "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3 HTTP API on a loopback port (moto's server, in memory), with the standard AWS variables set
    for this process and every process it starts (Ray workers, `near` subprocesses); yields the endpoint."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request in every failure report
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # it binds 0.0.0.0 unless told
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as env:
        for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "near-test",
                            "AWS_SECRET_ACCESS_KEY": "near-test", "AWS_REGION": "us-east-1"}.items():
            env.setenv(name, value)
        env.delenv("AWS_SESSION_TOKEN", raising=False)
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture
def s3_root(s3_server: str) -> str:
    """A data root URL in a fresh bucket of the session's S3 server."""
    import boto3

    bucket = f"near-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/data"


@pytest.fixture
def postgres_uri(postgres_server: str) -> str:
    """A fresh database on the session's PostgreSQL server, as a catalog URI."""
    import sqlalchemy

    name = f"near_{uuid.uuid4().hex[:12]}"
    engine = sqlalchemy.create_engine(f"{postgres_server}/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return f"{postgres_server}/{name}"
