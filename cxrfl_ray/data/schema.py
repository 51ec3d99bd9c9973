"""The one-row-per-image Arrow schema every dataset shares (ingested or synthetic).

Images are stored as losslessly encoded grayscale PNG bytes so a dataset is compact, any row
can be decoded on its own, and 16-bit sources keep their depth. See docs/DATA.md.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

SPLITS = ("train", "val", "test")
NO_LABEL = -1

RSNA_LABELS = ("Normal", "No Lung Opacity / Not Normal", "Lung Opacity")

BOX_TYPE = pa.struct(
    [
        ("x", pa.float32()),
        ("y", pa.float32()),
        ("width", pa.float32()),
        ("height", pa.float32()),
    ]
)

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("site", pa.string(), nullable=False),
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("label", pa.int16(), nullable=False),
        pa.field("label_name", pa.string()),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("bit_depth", pa.int8(), nullable=False),
        pa.field("mask", pa.binary()),
        pa.field("view", pa.string()),
        pa.field("sex", pa.string()),
        pa.field("age", pa.float32()),
        pa.field("original_path", pa.string()),
        pa.field("boxes", pa.list_(BOX_TYPE)),
    ],
    metadata={"cxrfl_schema_version": str(SCHEMA_VERSION)},
)

# Columns that are cheap to read for planning: everything but the pixel payloads.
METADATA_COLUMNS = tuple(f.name for f in SCHEMA if f.name not in ("image", "mask", "boxes"))
