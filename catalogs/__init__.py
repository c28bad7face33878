"""Versioned catalogs: content-addressed keys, write-once Zarr packs, Iceberg tables, releases (DESIGN section 7).

`catalogs.release_reader` (and `catalogs.packs`) need only pyarrow, zarr and numpy, so training can read a
release without the catalog; everything touching the tables imports pyiceberg.
"""
