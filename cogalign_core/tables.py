"""Typed Parquet tables: explicit pyarrow schemas, dictionary-encoded enums, versioned metadata.

Every table a stage writes goes through :func:`write_table`, which casts to the declared schema
(so a wrong type fails loudly at write time, not at read time three stages later), records the
schema name and version in the file's key-value metadata, and writes atomically. The files are
plain Parquet: polars, pandas and ``datasets.load_dataset("parquet", ...)`` read them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cogalign_core import taxonomy
from cogalign_core.io import atomic_path

SCHEMA_VERSION = "1"
META_SCHEMA = b"cogalign.schema"
META_VERSION = b"cogalign.schema_version"
META_TAXONOMY = b"cogalign.taxonomy_version"


def enum() -> pa.DataType:
    """Dictionary-encoded string: how every categorical column is stored."""
    return pa.dictionary(pa.int32(), pa.string())


BOX = pa.struct([("xmin", pa.int32()), ("ymin", pa.int32()), ("xmax", pa.int32()), ("ymax", pa.int32())])
"""A box in the stored image's pixel frame, inclusive corners, origin top-left."""

SAMPLES = pa.schema([
    ("sample_id", pa.string()),          # "s" + 16 hex of SHA-256 over decoded RGB pixels + shape
    ("batch_id", enum()),
    ("role", enum()),                    # train | test (test = external test batch, never trained on)
    ("dataset", enum()),
    ("class_label", pa.string()),        # source class folder / manifest label, if any
    ("name_hash", pa.string()),          # salted hash of the original relative path
    ("group_id_hash", pa.string()),      # salted hash of sequence / patient id, if any
    ("image_path", pa.string()),         # workspace-relative, content-addressed
    ("image_sha256", pa.string()),       # of the stored file
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("source_format", enum()),
    ("source_mode", enum()),
    ("metadata_stripped", pa.bool_()),   # the source carried EXIF/ICC/text chunks that were dropped
    ("phash", pa.string()),              # 64-bit perceptual hash, hex
    ("near_dup_cluster", pa.string()),   # sample_id of the cluster's first-ingested member
    ("mask_path", pa.string()),
    ("mask_sha256", pa.string()),
    ("mask_binarise_threshold", pa.int16()),  # null when the source mask was already binary
    ("mask_area_fraction", pa.float32()),
    ("boxes", pa.list_(BOX)),            # source boxes (bboxes.json / manifest), pixel frame
    ("kvasir_sessile", pa.bool_()),
    ("labels", pa.struct([(level, pa.string()) for level in taxonomy.LEVELS])),  # given at ingest, or null
])

QUARANTINE = pa.schema([
    ("batch_id", enum()),
    ("name_hash", pa.string()),          # salted hash of the unit's name (`cogalign quarantine` shows the path)
    ("kind", enum()),                    # image | mask | manifest_row | entry
    ("reason", enum()),                  # see QUARANTINE_REASONS
    ("detail", pa.string()),
])

QUARANTINE_REASONS: tuple[str, ...] = (
    "undecodable", "truncated", "empty_file", "not_an_image", "too_small", "too_many_pixels",
    "mask_missing", "mask_corrupt", "mask_size_mismatch", "malformed_manifest_row",
    "outside_source_root", "unreadable", "unsupported_mode", "symlink_not_followed",
)

DUPLICATES = pa.schema([
    ("batch_id", enum()),
    ("name_hash", pa.string()),
    ("duplicate_of", pa.string()),       # sample_id already ingested with identical pixels
])

SPLITS: tuple[str, ...] = ("train", "val", "test", "external_test")
PROVENANCE: tuple[str, ...] = ("dataset_label", "ingest_label", "derived_from_mask", "clinician", "model")

ANNOTATIONS = pa.schema(
    [
        ("sample_id", pa.string()),
        ("dataset", enum()),
        ("batch_id", enum()),
        ("role", enum()),
        ("split", enum()),
        ("group_key", pa.string()),      # salted hash of dataset + sequence/patient + near-dup cluster
        ("image_path", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("mask_path", pa.string()),
        ("boxes", pa.list_(BOX)),
        ("lesion_count", pa.int32()),
        ("lesion_area_fraction", pa.float32()),
        ("frame_region", enum()),
    ]
    + [f for level in taxonomy.LEVELS for f in ((level, enum()), (f"{level}_source", enum()))]
    + [("answer", pa.string())]
)

ANNOTATION_REJECTS = pa.schema([
    ("source", enum()),                  # clinician_csv | dataset_label
    ("row", pa.int32()),
    ("sample_id", pa.string()),
    ("reason", enum()),
    ("detail", pa.string()),
])


def table_from_rows(rows: Sequence[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """Build a table of exactly ``schema`` from row dicts (missing keys become null)."""
    columns = {f.name: [r.get(f.name) for r in rows] for f in schema}
    arrays = []
    for f in schema:
        if pa.types.is_dictionary(f.type):
            arrays.append(pa.array(columns[f.name], type=pa.string()).dictionary_encode().cast(f.type))
        else:
            arrays.append(pa.array(columns[f.name], type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _compact_dictionaries(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Re-encode dictionary columns as one chunk holding only the values used, in first-use order, so the
    bytes written depend on the values alone (not on how the table was filtered or concatenated)."""
    for i, f in enumerate(schema):
        col = table.column(i)
        if pa.types.is_dictionary(f.type) and pa.types.is_dictionary(col.type):
            table = table.set_column(i, f.name, col.cast(pa.string()).combine_chunks().dictionary_encode())
    return table


def table_from_polars(frame: Any, schema: pa.Schema) -> pa.Table:
    """A polars DataFrame as an Arrow table of exactly ``schema`` (columns selected and cast by name)."""
    table = frame.select(schema.names).to_arrow()
    arrays = []
    for f in schema:
        col = table.column(f.name)
        if pa.types.is_dictionary(f.type):
            col = col.cast(pa.string()).combine_chunks().dictionary_encode()
        arrays.append(col.cast(f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def write_table(table: pa.Table, path: str | os.PathLike[str], schema: pa.Schema, name: str) -> None:
    """Cast ``table`` to ``schema``, stamp schema name/version metadata, write atomically.

    Output is deterministic for identical input (fixed compression, no timestamps), so DVC
    hashes stay stable across reruns.
    """
    table = _compact_dictionaries(table.select(schema.names), schema).cast(schema)
    meta = dict(schema.metadata or {})
    meta.update({META_SCHEMA: name.encode(), META_VERSION: SCHEMA_VERSION.encode(),
                 META_TAXONOMY: taxonomy.TAXONOMY_VERSION.encode()})
    table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", store_schema=True)


def write_rows(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], schema: pa.Schema,
               name: str) -> None:
    """:func:`table_from_rows` then :func:`write_table`."""
    write_table(table_from_rows(rows, schema), path, schema, name)


def read_table(path: str | os.PathLike[str], expected: str | None = None) -> pa.Table:
    """Read a table, checking its schema name (and version) when ``expected`` is given."""
    table = pq.read_table(path)
    if expected is not None:
        meta = table.schema.metadata or {}
        got = meta.get(META_SCHEMA, b"").decode()
        if got != expected:
            raise ValueError(f"{path}: expected a {expected!r} table, found {got or 'no schema tag'!r}")
        version = meta.get(META_VERSION, b"").decode()
        if version != SCHEMA_VERSION:
            raise ValueError(f"{path}: schema version {version!r}, this code reads {SCHEMA_VERSION!r}")
    return table


def read_rows(path: str | os.PathLike[str], expected: str | None = None) -> list[dict[str, Any]]:
    """Read a table as a list of row dicts (dictionary columns decoded to str)."""
    return read_table(path, expected).to_pylist()
