"""The catalog: four Apache Iceberg tables through pyiceberg's SQL catalog (namespace `factory`).

    sources     one row per observed source revision (asset_id, source_id = sha256 of the bytes, ...)
    step_specs  one row per spec_hash (step, version, params, models, env, implementation fingerprint)
    artifacts   append-only registry: one row per executed (step, asset) with lineage, status and pack slices;
                a failed row has its `reason` (`infra.errors.Reason`), message (`error`) and `stderr_tail`
    samples     overwritten per release (one row per sample and role); releases are tags on its snapshots

The SQL catalog's compare-and-swap on the metadata pointer makes every commit atomic; a commit that loses
the race is retried on the refreshed table. By default the catalog is an SQLite file beside the data;
any SQLAlchemy URI (Postgres) serves several hosts.

Every location the catalog writes is `near-root:///<path in the root>`, which `RootFileIO` resolves against the
data root this process opened: the root is relocatable (`catalogs.data_root`). The `factory` namespace records
the root's id, and an open refuses a catalog that is not its root's. A read-only open writes nothing at all.
"""

import collections
import datetime
import json
import logging
import os
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.exceptions import (
    CommitFailedException,
    NamespaceAlreadyExistsError,
    NoSuchNamespaceError,
    NoSuchTableError,
    TableAlreadyExistsError,
)
from pyiceberg.expressions import AlwaysTrue
from pyiceberg.io.pyarrow import PyArrowFileIO
from pyiceberg.table import StaticTable, Table
from pyiceberg.typedef import EMPTY_DICT, Properties
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from catalogs.data_root import DataRoot
from catalogs.errors import CatalogError, CatalogMismatch, StaleVersionError
from catalogs.keys import StepSpec, implementation_fingerprint, package_version
from catalogs.storage import RootPath, iceberg_properties, is_local, is_url, root_path

logger = logging.getLogger(__name__)

NAMESPACE = "factory"
CATALOG_FILE = "catalog.db"
COMMIT_ATTEMPTS = 20
ROOT_URI = "near-root:///"
"""Prefix of every location the catalog stores: a path relative to the data root."""
ROOT_PATH_PROPERTY = "near.data-root"
"""FileIO property: where this process finds the data root (never stored)."""
ROOT_ID_PROPERTY = "near.root-id"
"""Namespace property: the id of the data root the catalog belongs to."""
_TIMESTAMP = pa.timestamp("us", tz="UTC")
_ARRAY_SLICE = pa.struct([("name", pa.string()), ("row_start", pa.int64()), ("row_count", pa.int64()),
                          ("shape", pa.list_(pa.int32())), ("dtype", pa.string())])
_INPUT = pa.struct([("role", pa.string()), ("key", pa.string())])


def _required(name: str, type_: pa.DataType) -> pa.Field:
    return pa.field(name, type_, nullable=False)


SCHEMAS: dict[str, pa.Schema] = {
    "sources": pa.schema([
        _required("asset_id", pa.string()), _required("source_id", pa.string()), pa.field("uri", pa.string()),
        pa.field("size", pa.int64()), pa.field("kind", pa.string()), pa.field("origin", pa.string()),
        pa.field("license", pa.string()), pa.field("attrs_json", pa.string()), _required("observed_at", _TIMESTAMP),
        pa.field("ingest_run", pa.string()),
    ]),
    "step_specs": pa.schema([
        _required("spec_hash", pa.string()), _required("step", pa.string()), _required("version", pa.string()),
        pa.field("inputs", pa.list_(pa.string())), pa.field("params_json", pa.string()),
        pa.field("models_json", pa.string()), pa.field("env_json", pa.string()),
        pa.field("impl_fingerprint", pa.string()), pa.field("code_version", pa.string()),
        _required("created_at", _TIMESTAMP),
    ]),
    "artifacts": pa.schema([
        _required("artifact_key", pa.string()), _required("step", pa.string()), _required("spec_hash", pa.string()),
        _required("asset_id", pa.string()), _required("source_id", pa.string()), pa.field("inputs", pa.list_(_INPUT)),
        _required("status", pa.string()), pa.field("error", pa.string()), pa.field("pack_path", pa.string()),
        pa.field("arrays", pa.list_(_ARRAY_SLICE)), pa.field("content_digest", pa.string()),
        pa.field("stats_json", pa.string()), pa.field("run_id", pa.string()), pa.field("worker", pa.string()),
        pa.field("duration_s", pa.float32()), _required("created_at", _TIMESTAMP),
        pa.field("reason", pa.string()), pa.field("stderr_tail", pa.string()),
    ]),
    "samples": pa.schema([
        _required("sample_id", pa.string()), _required("source_id", pa.string()), _required("split", pa.string()),
        pa.field("weight", pa.float32()), _required("role", pa.string()), _required("step", pa.string()),
        _required("artifact_key", pa.string()), _required("pack_path", pa.string()),
        pa.field("arrays", pa.list_(_ARRAY_SLICE)), pa.field("content_digest", pa.string()),
    ]),
}

STATUSES = ("ok", "failed", "skipped_invalid")


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


class RootFileIO(PyArrowFileIO):
    """pyiceberg's Arrow file IO, with `near-root:///<path>` resolved against the data root of this process (a
    local folder or an object-store URL)."""

    @staticmethod
    def parse_location(location: str, properties: Properties = EMPTY_DICT) -> tuple[str, str, str]:
        if location.startswith(ROOT_URI):
            root, relative = properties[ROOT_PATH_PROPERTY], location.removeprefix(ROOT_URI)
            if not is_url(root):
                return "file", "", os.path.join(root, relative)
            location = f"{root.rstrip('/')}/{relative}"
        return PyArrowFileIO.parse_location(location, properties)


def io_properties(data_root: str | os.PathLike[str]) -> dict[str, str]:
    """What a pyiceberg catalog or static table needs to read and write `near-root:` locations of this root."""
    root = str(root_path(data_root))
    return {"py-io-impl": f"{__name__}.{RootFileIO.__name__}", ROOT_PATH_PROPERTY: root, **iceberg_properties(root)}


def static_table(data_root: str | os.PathLike[str], metadata_location: str) -> StaticTable:
    """A table read from its metadata file alone (no catalog), e.g. a release's `metadata_location`."""
    return StaticTable.from_metadata(metadata_location, properties=io_properties(data_root))


class FactoryCatalog:
    """The four tables of one data root. Tensors live in packs under `data_root`; tables under `warehouse/`.

    `read_only` opens an existing root and catalog and writes nothing (not even SQLite's own tables); otherwise
    a missing root is created and an empty catalog initialised for it.

    Raises:
        NotADataRoot: `read_only` and the folder is not a data root.
        CatalogMismatch: the catalog belongs to another root, is empty while the root holds data, or (a legacy
            root) keeps its tables outside the root.
    """

    def __init__(self, data_root: str | os.PathLike[str], uri: str | None = None, *, read_only: bool = False) -> None:
        self.uri = uri or _sqlite_beside(root_path(data_root))
        root = DataRoot.open(data_root) if read_only else DataRoot.create(data_root)
        self.data_root, self.read_only = root.path, read_only
        self._catalog = _sql_catalog(self.uri, self.data_root, read_only)
        self.root_id = self._check_owner(root)
        self._tables: dict[str, Table] = {name: self._load(name) for name in SCHEMAS}

    def _check_owner(self, root: DataRoot) -> str | None:
        """The root id this catalog and root share (None: a legacy root proven by its tables' locations)."""
        try:
            recorded = self._catalog.load_namespace_properties(NAMESPACE)
        except (NoSuchNamespaceError, OperationalError):  # OperationalError: read-only, no catalog tables at all
            return self._initialise(root)
        catalog_id = recorded.get(ROOT_ID_PROPERTY)
        if catalog_id is not None:
            if catalog_id != root.root_id:
                raise CatalogMismatch(
                    f"catalog {self.uri} belongs to data root {catalog_id}, but {root.path} is "
                    f"{root.root_id or 'a root without an id'}: pass this root's own catalog"
                )
            self._check_legacy_locations()
            return catalog_id
        self._check_legacy_locations()
        if self.read_only:
            return root.root_id
        root = root if root.root_id else root.with_new_id()
        self._catalog.update_namespace_properties(NAMESPACE, updates={ROOT_ID_PROPERTY: root.root_id})
        logger.info("data root %s adopted its catalog %s as root %s", root.path, self.uri, root.root_id)
        return root.root_id

    def _initialise(self, root: DataRoot) -> str:
        """Start an empty catalog for `root`: only for a root whose packs and releases it cannot be missing."""
        if self.read_only:
            raise CatalogMismatch(f"catalog {self.uri} holds no factory tables: it is not the catalog of {root.path}")
        if root.holds_data():
            raise CatalogMismatch(
                f"{root.path} holds packs or releases that catalog {self.uri} does not know: it is not this root's "
                f"catalog (a new one would take every committed pack for an orphan)"
            )
        root = root if root.root_id else root.with_new_id()
        try:
            _retry(lambda: self._catalog.create_namespace(NAMESPACE, {ROOT_ID_PROPERTY: root.root_id}), "create namespace")
        except NamespaceAlreadyExistsError:  # another process initialised it meanwhile
            return self._check_owner(root)
        return root.root_id

    def _check_legacy_locations(self) -> None:
        """Tables made before root-relative locations store absolute ones: the catalog is this root's only if
        they lie in it. Read from the catalog's own rows (the JDBC catalog schema), before pyiceberg would
        follow them into another root's files."""
        warehouse = self.data_root / "warehouse"
        inside = (warehouse.as_uri() if is_local(warehouse) else str(warehouse)) + "/"
        query = text("SELECT table_name, metadata_location FROM iceberg_tables "
                     "WHERE catalog_name = :catalog AND table_namespace = :namespace")
        with self._catalog.engine.connect() as connection:
            rows = connection.execute(query, {"catalog": self._catalog.name, "namespace": NAMESPACE}).all()
        for name, location in rows:
            if location and not location.startswith((ROOT_URI, inside)):
                raise CatalogMismatch(
                    f"catalog {self.uri} keeps table {name} at {location}, outside {self.data_root}: it belongs to "
                    f"another root, or this root was moved, which roots made before root-relative locations cannot be"
                )

    def _load(self, name: str) -> Table:
        identifier = f"{NAMESPACE}.{name}"
        try:
            return self._evolved(self._catalog.load_table(identifier), name)
        except NoSuchTableError:
            if self.read_only:
                raise CatalogMismatch(f"catalog {self.uri} has no table {identifier}") from None
        try:
            table = _retry(lambda: self._catalog.create_table(identifier, schema=SCHEMAS[name]), f"create {name}")
        except TableAlreadyExistsError:  # another process created it meanwhile
            return self._catalog.load_table(identifier)
        if name == "artifacts":
            table.update_spec().add_identity("step").commit()
        return table

    def _evolved(self, table: Table, name: str) -> Table:
        """A table made by an older version gains the columns added since (nullable, so old rows read as null);
        a read-only open leaves it as it is and reads the missing columns as null."""
        missing = [f for f in SCHEMAS[name] if f.name not in table.schema().column_names]
        if missing and not self.read_only:
            def evolve() -> None:
                with self._catalog.load_table(table.name()).update_schema() as update:
                    update.union_by_name(pa.schema(missing))
            _retry(evolve, f"add columns {[f.name for f in missing]} to {name}")
            return self._catalog.load_table(table.name())
        return table

    def table(self, name: str) -> Table:
        """The table as last committed (refreshed on every call)."""
        return self._tables[name].refresh()

    def read(self, name: str, columns: tuple[str, ...] = ("*",), snapshot_id: int | None = None,
             row_filter: str | None = None) -> pa.Table:
        table = self.table(name)
        present = table.schema().column_names
        selected = columns if columns == ("*",) else tuple(c for c in columns if c in present)
        result = table.scan(row_filter=row_filter or AlwaysTrue(), selected_fields=selected, snapshot_id=snapshot_id).to_arrow()
        if not result.num_rows:
            return _empty(SCHEMAS[name], columns)
        for field in SCHEMAS[name]:  # columns an older, read-only table lacks
            if field.name not in result.column_names and (columns == ("*",) or field.name in columns):
                result = result.append_column(field.name, pa.nulls(result.num_rows, field.type))
        return result if columns == ("*",) else result.select(list(columns))

    # -- writes: each is one atomic Iceberg commit -------------------------------------------------------------

    def append(self, name: str, rows: pa.Table, properties: Mapping[str, str] | None = None) -> int:
        """Append rows in one commit (retried on conflict); returns the new snapshot id."""
        if self.read_only:
            raise CatalogError(f"catalog {self.uri} was opened read-only; cannot append to {name}")
        rows = rows.select(SCHEMAS[name].names).cast(SCHEMAS[name])

        def commit() -> int:
            table = self.table(name)
            table.append(rows, snapshot_properties=dict(properties or {}))
            return table.current_snapshot().snapshot_id

        return _retry(commit, f"append {rows.num_rows} rows to {name}")

    def register_sources(self, rows: pa.Table, run_id: str = "") -> int:
        rows = _with_defaults(rows, SCHEMAS["sources"], observed_at=utc_now(), ingest_run=run_id)
        return self.append("sources", rows, {"run_id": run_id})

    def current_sources(self) -> pa.Table:
        """The latest observed revision of every asset."""
        rows = self.read("sources")
        return dedupe_first(rows.sort_by([("asset_id", "ascending"), ("observed_at", "descending")]), "asset_id")

    def register_specs(self, specs: list[StepSpec], code_version: str | None = None, *, strict: bool | None = None) -> list[str]:
        """Record specs not yet known; returns their spec hashes.

        A step whose recorded implementation fingerprint differs from its current code under the same version
        probably needs a version bump: that is logged as a warning, or raised (StaleVersionError) when `strict`
        (default: in CI, i.e. when $CI is set)."""
        known = self.read("step_specs", ("spec_hash", "step", "version", "impl_fingerprint"))
        recorded = collections.defaultdict(set)
        for step, version, fingerprint in zip(known["step"].to_pylist(), known["version"].to_pylist(), known["impl_fingerprint"].to_pylist()):
            if fingerprint:
                recorded[(step, version)].add(fingerprint)
        fingerprints = {s.spec_hash: implementation_fingerprint(s) for s in specs}
        stale = [f"step {s.name!r} version {s.version!r}: its code changed since that version was recorded; bump the version "
                 f"if outputs change" for s in specs if fingerprints[s.spec_hash] and recorded[(s.name, s.version)]
                 and fingerprints[s.spec_hash] not in recorded[(s.name, s.version)]]
        if stale and (strict if strict is not None else bool(os.environ.get("CI"))):
            raise StaleVersionError("; ".join(stale))
        for message in stale:
            logger.warning(message)
        known_hashes = set(known["spec_hash"].to_pylist())
        new = [s for s in specs if s.spec_hash not in known_hashes]
        if new:
            self.append("step_specs", pa.Table.from_pylist([{
                "spec_hash": s.spec_hash, "step": s.name, "version": s.version, "inputs": list(s.inputs),
                "params_json": json.dumps(dict(s.params), sort_keys=True), "models_json": json.dumps(dict(s.models), sort_keys=True),
                "env_json": json.dumps(dict(s.env), sort_keys=True), "impl_fingerprint": fingerprints[s.spec_hash],
                "code_version": code_version or package_version(), "created_at": utc_now(),
            } for s in new], schema=SCHEMAS["step_specs"]))
        return [s.spec_hash for s in specs]

    def commit_artifacts(self, rows: pa.Table, run_id: str) -> int:
        """Register executed artifacts (their packs are already on disk): the commit point of a batch."""
        rows = _with_defaults(rows, SCHEMAS["artifacts"], created_at=utc_now(), run_id=run_id)
        bad = set(rows["status"].to_pylist()) - set(STATUSES)
        if bad:
            raise ValueError(f"unknown artifact status {sorted(bad)}; expected {STATUSES}")
        return self.append("artifacts", rows, {"run_id": run_id, "rows": str(rows.num_rows)})

    def artifact_status(self) -> pa.Table:
        """(artifact_key, status) with duplicates resolved: see `resolve_status`."""
        return resolve_status(self.read("artifacts", ("artifact_key", "status", "created_at"))).select(["artifact_key", "status"])

    def ok_artifacts(self) -> pa.Table:
        """Every `ok` artifact row, one per key (the earliest, so re-executions never move a key's bytes)."""
        rows = self.read("artifacts", row_filter="status == 'ok'")
        return dedupe_first(rows.sort_by([("artifact_key", "ascending"), ("created_at", "ascending")]), "artifact_key")


def resolve_status(rows: pa.Table) -> pa.Table:
    """One row per artifact_key of registry rows (with `status`, `created_at`): `ok` wins, else the latest failure."""
    rank = pc.if_else(pc.equal(rows["status"], "ok"), 0, 1)
    rows = rows.append_column("rank", rank).sort_by([("artifact_key", "ascending"), ("rank", "ascending"),
                                                      ("created_at", "descending")])
    return dedupe_first(rows, "artifact_key").drop_columns(["rank"])


def dedupe_first(rows: pa.Table, key: str) -> pa.Table:
    """Keep the first row of each run of equal `key` values (rows sorted by `key`)."""
    if rows.num_rows == 0:
        return rows
    keys = rows[key].combine_chunks()
    first = pc.fill_null(pc.not_equal(keys, pa.concat_arrays([pa.array([None], keys.type), keys[:-1]])), True)
    return rows.filter(first)


def _with_defaults(rows: pa.Table, schema: pa.Schema, **defaults: Any) -> pa.Table:
    for name, value in defaults.items():
        if name not in rows.column_names:
            rows = rows.append_column(name, pa.array([value] * rows.num_rows, type=schema.field(name).type))
    for field in schema:
        if field.name not in rows.column_names:
            rows = rows.append_column(field.name, pa.nulls(rows.num_rows, field.type))
    return rows.select(schema.names).cast(schema)


def _empty(schema: pa.Schema, columns: tuple[str, ...]) -> pa.Table:
    names = schema.names if columns == ("*",) else list(columns)
    return schema.empty_table().select(names)


def _retry(operation, what: str):
    """Run a catalog operation, retrying lost compare-and-swap races and a busy SQLite file with jittered backoff."""
    for attempt in range(COMMIT_ATTEMPTS):
        try:
            return operation()
        except (CommitFailedException, OperationalError) as err:
            if attempt == COMMIT_ATTEMPTS - 1:
                raise
            wait = min(2.0, 0.05 * 2**attempt) * (0.5 + random.random())
            logger.debug("%s: %s; retrying in %.2fs", what, type(err).__name__, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def _sqlite_beside(data_root: RootPath) -> str:
    """The default catalog: an SQLite file in the root, which an object store cannot hold."""
    if not is_local(data_root):
        raise CatalogError(f"data root {data_root} is in an object store, which cannot hold an SQLite catalog: "
                           f"pass a catalog URI (PostgreSQL: postgresql+psycopg2://...)")
    return f"sqlite:///{data_root / CATALOG_FILE}"


def _sql_catalog(uri: str, data_root: RootPath, read_only: bool) -> SqlCatalog:
    """pyiceberg's SQL catalog on `uri`; read-only: an SQLite file opened with mode=ro, no tables created."""
    properties = {"warehouse": f"{ROOT_URI}warehouse", **io_properties(data_root)}
    if uri.startswith("sqlite"):
        database = Path(make_url(uri).database or "")
        _refuse_network_filesystem(database.absolute().parent)
        if read_only:
            if not database.is_file():
                raise CatalogMismatch(f"no catalog at {uri}: {database} does not exist")
            uri = f"sqlite:///file:{database.absolute()}?mode=ro&uri=true"
    if read_only:
        properties["init_catalog_tables"] = "false"
    try:
        return SqlCatalog("near", uri=uri, **properties)
    except OperationalError as err:
        raise CatalogMismatch(f"cannot open catalog {uri}: {err}") from err


def _refuse_network_filesystem(path: Path) -> None:
    """SQLite's locking is unreliable on network file systems: use a Postgres URI there."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return
    best, fs_type = "", ""
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3 and str(path).startswith(parts[1].rstrip("/") + "/") and len(parts[1]) > len(best):
            best, fs_type = parts[1], parts[2]
    if fs_type.startswith(("nfs", "cifs", "smb", "9p", "fuse.sshfs", "lustre")):
        raise CatalogError(f"{path} is on {fs_type}: an SQLite catalog there is unsafe; pass a Postgres URI instead")
