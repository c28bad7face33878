"""Ingest of a local folder on hostile entries: each bad entry is skipped with a reason that reaches the build
report, and a pattern that cannot name files under the folder is a ConfigError. No Ray, no Blender."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from catalogs.tables import FactoryCatalog
from infra.errors import ConfigError, Reason
from pipelines.build import BuildRecord
from pipelines.build_config import BuildConfig
from pipelines.ingest import find_sources, ingest
from pipelines.report import write_report

REPO = Path(__file__).resolve().parents[2]

_FIND_IN_CHILD = """
import json, sys
from pipelines.build_config import BuildConfig
from pipelines.ingest import find_sources
config = BuildConfig.from_dict({"data_root": sys.argv[2], "source": {"kind": "local", "path": sys.argv[1]}})
rows, skipped = find_sources(config)
skipped = {s.entry: s.reason.value for s in skipped}
print(json.dumps({"assets": rows["asset_id"].to_pylist(), "skipped": skipped}))
"""


def _local(tmp_path: Path, folder: Path, **source: str) -> BuildConfig:
    return BuildConfig.from_dict(
        {"data_root": str(tmp_path / "root"), "source": {"kind": "local", "path": str(folder), **source}}
    )


def _write(folder: Path, name: bytes, data: bytes = b"glTF asset bytes") -> None:
    """A file whose name is raw bytes (not necessarily UTF-8, as a POSIX file system allows)."""
    fd = os.open(os.path.join(os.fsencode(folder), name), os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, data)
    os.close(fd)


def _without_permission_override() -> list[str]:
    """A command prefix under which permission bits bind. Root reads a mode-000 file unless it gives up
    CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH; dropped from the bounding set, a root process exec'd under it
    lacks them."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: no way to make a file unreadable")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--"]


@pytest.mark.parametrize("pattern", ["/etc/**", "../**/*.glb", ""])
def test_a_pattern_outside_the_folder_is_a_config_error(tmp_path: Path, pattern: str) -> None:
    _write(tmp_path, b"a.glb")
    with pytest.raises(ConfigError, match=r"source\.pattern") as caught:
        find_sources(_local(tmp_path, tmp_path, pattern=pattern))
    assert repr(pattern) in str(caught.value)


@pytest.mark.parametrize("name", [b"bad\xff.glb", b"a\nb.glb", b"line\xe2\x80\xa8sep.glb"])
def test_a_file_name_that_is_no_valid_asset_id_is_skipped_with_a_reason(tmp_path: Path, name: bytes) -> None:
    folder = tmp_path / "assets"
    folder.mkdir()
    _write(folder, b"good.glb")
    _write(folder, name)
    catalog = FactoryCatalog(tmp_path / "root")
    ingested = ingest(catalog, _local(tmp_path, folder), "run-1")
    assert catalog.current_sources()["asset_id"].to_pylist() == ["good.glb"]
    sources, skipped = ingested
    assert sources["asset_id"].to_pylist() == ["good.glb"]
    assert [(s.reason, s.entry) for s in skipped] == [
        (Reason.INVALID_NAME, os.fsencode(name).decode("utf-8", "backslashreplace"))
    ]


def test_an_unreadable_file_is_skipped_with_a_reason(tmp_path: Path) -> None:
    folder = tmp_path / "assets"
    (folder / "sealed").mkdir(parents=True)
    for name in (b"ok.glb", b"locked.glb", b"sealed/inner.glb"):
        _write(folder, name)
    (folder / "locked.glb").chmod(0)  # cannot be opened
    (folder / "sealed").chmod(0o600)  # listed, but its entries cannot even be stat'ed
    prefix = _without_permission_override()
    assert subprocess.run([*prefix, "cat", str(folder / "locked.glb")], capture_output=True).returncode != 0
    child = subprocess.run(
        [*prefix, sys.executable, "-c", _FIND_IN_CHILD, str(folder), str(tmp_path / "root")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    found = json.loads(child.stdout.splitlines()[-1])
    assert found == {
        "assets": ["ok.glb"],
        "skipped": {"locked.glb": "unreadable_file", "sealed/inner.glb": "unreadable_file"},
    }


def test_skipped_entries_reach_the_build_report(tmp_path: Path) -> None:
    folder = tmp_path / "assets"
    folder.mkdir()
    _write(folder, b"bad\xff.glb")
    _, skipped = find_sources(_local(tmp_path, folder))
    record = BuildRecord("run-1", skipped_sources=[s.to_dict() for s in skipped])
    page = write_report(record, tmp_path).read_text()
    report = json.loads((tmp_path / "reports" / "run-1" / "report.json").read_text())
    assert report["skipped_sources"] == [
        {"entry": "bad\\xff.glb", "reason": "invalid_name", "message": skipped[0].message}
    ]
    assert "Skipped sources" in page and "invalid_name" in page and "bad\\xff.glb" in page
