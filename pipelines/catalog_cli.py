"""`near catalog log | show | diff | verify | gc`: views of a data root's catalog and releases.

Every command but `gc --delete` is read-only: it opens an existing root and its catalog without writing a byte,
and fails (exit 2) on a folder that is not a data root or a catalog that is not the root's.
"""

import collections
import datetime
import json
import sys

import click
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from catalogs.data_root import DataRoot
from catalogs.errors import ReleaseIntegrityError
from catalogs.gc import DEFAULT_GRACE_S, collect_garbage, find_garbage
from catalogs.release_reader import RELEASE_FILE, Release, read_record
from catalogs.storage import RootPath, is_local
from catalogs.tables import SCHEMAS, FactoryCatalog, resolve_status
from catalogs.verify import verify_catalog, verify_published_releases, verify_release, verify_release_record
from pipelines import scratch
from pipelines.build_config import CATALOG_URI_ENV_VAR

console = Console()


@click.group()
@click.option("--root", envvar="NEAR_DATA_ROOT", default="near-data", show_default=True,
              help="Data root: a folder or a URL such as s3://bucket/prefix [env NEAR_DATA_ROOT].")
@click.option("--catalog-uri", envvar=CATALOG_URI_ENV_VAR, default=None,
              help="SQLAlchemy URI of the catalog (default: SQLite file in the data root) [env NEAR_CATALOG_URI].")
@click.pass_context
def catalog(ctx: click.Context, root: str, catalog_uri: str | None) -> None:
    """Inspect, diff, verify and clean a versioned catalog."""
    ctx.obj = {"root": DataRoot.open(root).path, "uri": catalog_uri}


def _open(ctx: click.Context) -> FactoryCatalog:
    return FactoryCatalog(ctx.obj["root"], ctx.obj["uri"], read_only=True)


def _releases(root: RootPath) -> list[dict]:
    """Every release record under the root, oldest first; a damaged one as {"name", "damage"}."""
    infos = []
    for path in (root / "releases").glob(f"*/{RELEASE_FILE}"):
        try:
            infos.append(read_record(path.parent))
        except ReleaseIntegrityError as err:
            infos.append({"name": path.parent.name, "damage": str(err)})
    return sorted(infos, key=lambda info: info.get("created_at", ""))


@catalog.command()
@click.pass_context
def log(ctx: click.Context) -> None:
    """Commits to every table, newest last, and the published releases."""
    cat = _open(ctx)
    table = Table("committed (UTC)", "table", "operation", "run / release", "rows added", title="catalog commits")
    commits = []
    for name in SCHEMAS:
        for snapshot in cat.table(name).snapshots():
            extra = snapshot.summary.additional_properties if snapshot.summary else {}
            commits.append((snapshot.timestamp_ms, name, snapshot.summary.operation.value if snapshot.summary else "",
                            extra.get("run_id") or extra.get("release", ""), extra.get("added-records", "")))
    for ts, name, op, run, added in sorted(commits):
        table.add_row(datetime.datetime.fromtimestamp(ts / 1000, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"), name, op, run, added)
    console.print(table)
    _print_releases(ctx.obj["root"])


def _print_releases(root: RootPath) -> None:
    table = Table("release", "created (UTC)", "samples", "splits", "roles", "manifest sha256", title="releases")
    for info in _releases(root):
        if "damage" in info:
            table.add_row(info["name"], "[red]damaged", "", "", "", info["damage"])
            continue
        table.add_row(info["name"], str(info.get("created_at", ""))[:19], str(info["num_samples"]), json.dumps(info["splits"]),
                      ", ".join(f"{r}={v['step']}" for r, v in info["roles"].items()), info["manifest_sha256"][:16])
    console.print(table)


@catalog.command()
@click.argument("release", required=False)
@click.pass_context
def show(ctx: click.Context, release: str | None) -> None:
    """Artifact counts per step and status, or one release's contents."""
    if release:
        opened = Release.open(ctx.obj["root"], release)
        console.print_json(json.dumps(opened.info))
        counts = collections.Counter(zip(opened.manifest["role"].to_pylist(), opened.manifest["split"].to_pylist()))
        table = Table("role", "split", "samples", title=f"release {release}")
        for (role, split), n in sorted(counts.items()):
            table.add_row(role, split, str(n))
        console.print(table)
        return
    cat = _open(ctx)
    rows = cat.read("artifacts", ("artifact_key", "step", "status", "created_at", "reason"))
    status = resolve_status(rows)
    steps, statuses, reasons = (status[c].to_pylist() for c in ("step", "status", "reason"))
    counts = collections.Counter(zip(steps, statuses))
    table = Table("step", "ok", "failed", "skipped_invalid", "rows (with retries)", title=f"artifacts in {ctx.obj['root']}")
    raw = collections.Counter(rows["step"].to_pylist())
    for step in sorted({s for s, _ in counts}):
        table.add_row(step, *(str(counts.get((step, s), 0)) for s in ("ok", "failed", "skipped_invalid")), str(raw[step]))
    console.print(table)
    failed = collections.Counter((r or "(not recorded)", s) for s, st, r in zip(steps, statuses, reasons) if st == "failed")
    if failed:
        by_reason = Table("reason", "step", "failed artifacts", title="failures by reason")
        for (reason, step), n in sorted(failed.items()):
            by_reason.add_row(reason, step, str(n))
        console.print(by_reason)
    console.print(f"sources: {cat.current_sources().num_rows} current assets; step specs: {cat.read('step_specs').num_rows}")
    _print_releases(ctx.obj["root"])


@catalog.command()
@click.argument("a")
@click.argument("b")
@click.pass_context
def diff(ctx: click.Context, a: str, b: str) -> None:
    """What changed from release A to release B, per role."""
    old, new = Release.open(ctx.obj["root"], a), Release.open(ctx.obj["root"], b)

    def keys(release: Release) -> dict[tuple[str, str], str]:
        m = release.manifest
        return dict(zip(zip(m["role"].to_pylist(), m["sample_id"].to_pylist()), m["artifact_key"].to_pylist()))

    before, after = keys(old), keys(new)
    table = Table("role", "added", "removed", "changed", "unchanged", title=f"{a} -> {b}")
    for role in sorted({r for r, _ in before} | {r for r, _ in after}):
        x = {s: k for (r, s), k in before.items() if r == role}
        y = {s: k for (r, s), k in after.items() if r == role}
        changed = sum(1 for s in x.keys() & y.keys() if x[s] != y[s])
        table.add_row(role, str(len(y.keys() - x.keys())), str(len(x.keys() - y.keys())), str(changed),
                      str(len(x.keys() & y.keys()) - changed))
    console.print(table)
    for role in sorted(set(old.info["roles"]) | set(new.info["roles"])):
        h0, h1 = (r.info["roles"].get(role, {}).get("spec_hash") for r in (old, new))
        if h0 != h1:
            console.print(f"role {role}: spec {str(h0)[:12]} -> {str(h1)[:12]} (a step's params, version or models changed)")


@catalog.command()
@click.argument("release", required=False)
@click.option("--deep", is_flag=True, help="Without RELEASE: also re-read and re-hash every artifact's bytes.")
@click.pass_context
def verify(ctx: click.Context, release: str | None, deep: bool) -> None:
    """Re-check a release (record and manifest against the catalog, every sample's bytes), or the whole root:
    every committed pack (with --deep, its bytes) and every release's record. Exits 1 on any problem."""
    cat = _open(ctx)
    if release:
        try:
            opened = Release.open(cat.data_root, release)
        except ReleaseIntegrityError as err:
            console.print(f"[red]release {release}[/red]: {err}")
            sys.exit(1)
        total, label = opened.manifest.num_rows, f"release {release}"

        def check(on_row):
            yield from verify_release_record(cat, opened)
            yield from verify_release(opened, on_row)
    else:
        total, label = cat.ok_artifacts().num_rows, "catalog packs" + (" and bytes" if deep else "") + " and releases"

        def check(on_row):
            yield from verify_catalog(cat, deep=deep, on_row=on_row)
            yield from verify_published_releases(cat)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"verifying {label}", total=total)
        problems = list(check(lambda: bar.advance(task)))
    for p in problems:
        console.print(f"[red]{p.where}[/red]: {p.what}", soft_wrap=True)
    console.print(f"{label}: {total} checked, {len(problems)} problems")
    sys.exit(1 if problems else 0)


@catalog.command()
@click.option("--grace-hours", type=float, default=DEFAULT_GRACE_S / 3600, show_default=True,
              help="Leave unreferenced packs younger than this (a batch may still be on its way to its commit).")
@click.option("--delete", is_flag=True, help="Delete what is listed (default: only list it).")
@click.pass_context
def gc(ctx: click.Context, grace_hours: float, delete: bool) -> None:
    """List (or delete) pack folders that nothing committed or released refers to, and the scratch of builds
    that are gone. Refuses (exit 2) unless the catalog provably is this root's."""
    cat = _open(ctx)
    garbage = find_garbage(cat, grace_hours * 3600)
    local_scratch = cat.data_root / "scratch" if is_local(cat.data_root) else None  # an object store has none
    stale = scratch.stale_runs(local_scratch) if local_scratch else []
    table = Table("path", "age (h)", "MiB", "why", title="garbage" if garbage or stale else "no garbage")
    for g in garbage:
        table.add_row(g.pack_path, f"{g.age_s / 3600:.1f}", f"{g.size_bytes / 2**20:.1f}", g.reason)
    for run in stale:
        table.add_row(run.path.relative_to(cat.data_root).as_posix(), "", f"{run.size_bytes / 2**20:.1f}", f"stale scratch: {run.reason}")
    console.print(table)
    if delete and (garbage or stale):
        removed = scratch.remove_stale_runs(local_scratch) if local_scratch else []
        freed = collect_garbage(cat, garbage) + sum(run.size_bytes for run in removed)
        console.print(f"deleted {len(garbage)} packs and {len(stale)} scratch folders, {freed / 2**20:.1f} MiB")
    elif garbage or stale:
        console.print("dry run: pass --delete to remove them")
