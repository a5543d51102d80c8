"""`passages.arrow`: the memory-mappable table serving reads."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage import layout
from storage.errors import RagindexError
from storage.fs import staged_local_file
from storage.location import Location


def write_passage_table(passages: Location, table_file: Location,
                        first_row_id: int = 0) -> int:
    """Write passages.arrow (Arrow IPC file, uncompressed, row i == row_id first_row_id + i) and return
    its row count."""
    src_fs, src_dir = passages.fs, passages.path
    fs, path = table_file.fs, table_file.path
    rows = 0
    columns = list(layout.TABLE_COLUMNS)
    # Exits run inside out: the IPC writer finishes the file before it is published.
    with staged_local_file(fs, path) as tmp, pa.OSFile(tmp, "wb") as sink, \
            pa.ipc.new_file(sink, layout.TABLE_SCHEMA) as writer:
        for shard in layout.passage_shard_paths(src_fs, src_dir):
            with src_fs.open(shard, "rb") as f:
                pf = pq.ParquetFile(f)
                missing = set(columns) - set(pf.schema_arrow.names)
                if missing:
                    raise RagindexError(f"{shard} lacks column(s) {', '.join(sorted(missing))}")
                for batch in pf.iter_batches(batch_size=8192, columns=columns):
                    table = pa.Table.from_batches([batch]).cast(layout.TABLE_SCHEMA)
                    ids = table.column("row_id").to_numpy()
                    first = first_row_id + rows
                    if len(ids) and (ids[0] != first or not np.array_equal(ids, np.arange(first, first + len(ids)))):
                        raise RagindexError(f"{shard}: row_id not contiguous at row {first} (got {ids[0]})")
                    for b in table.to_batches():
                        writer.write_batch(b)
                    rows += len(ids)
    return rows

