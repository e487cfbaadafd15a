"""Document streams: local files and Hub datasets read through the same `datasets` builders, streamed.

Local `.txt` goes through the `text` builder (one document per file, `sample_by="document"`), `.jsonl`/`.json`
through `json`, `.parquet` through `parquet`: the loaders the Hub path uses, so tests exercise it offline.
"""
from __future__ import annotations

import codecs
import glob
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from data.corpora.catalog import CATALOG, EMBEDDED, DatasetEntry, dataset_entry
from data.errors import DataError

# Suffix -> `datasets` packaged builder.
BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Without network `load_dataset` retries for ~23 s (docs/machine_notes.md); a 3 s TCP probe answers first.
NETWORK_PROBE_TIMEOUT_S = 3.0
OFFLINE_HINT = ("use local files instead (a .txt/.jsonl/.json/.parquet file, glob or folder: "
                "tools/preprocess_data.py --input PATH), or the embedded default corpus 'shakespeare'")


@dataclass(frozen=True, kw_only=True)
class DocumentSource:
    """Where documents come from: a catalog dataset on the Hub, or local files of one format."""

    name: str
    """Catalog name, or the path/glob as given."""
    builder: str
    """`datasets` builder or Hub id passed to load_dataset."""
    config: str | None = None
    """Dataset config for Hub datasets."""
    data_files: tuple[str, ...] = ()
    """Local files, expanded and sorted (empty for Hub datasets)."""
    data_dir: str | None = None
    """Sub-folder of a Hub repository."""
    split: str = "train"
    """Split to read."""
    text_field: str = "text"
    """Column holding the text."""

    @property
    def is_local(self) -> bool:
        """True for local files (no network needed)."""
        return bool(self.data_files)


def _expand(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in BUILDERS)
    if glob.has_magic(spec):
        return sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    return [path] if path.is_file() else []


def looks_like_path(spec: str) -> bool:
    """True when spec is meant as a local path (it has a separator, a known suffix, a glob, or exists)."""
    return (os.sep in spec or glob.has_magic(spec) or Path(spec).suffix.lower() in BUILDERS
            or Path(spec).exists())


def resolve_source(spec: str, *, text_field: str | None = None) -> DocumentSource:
    """A catalog name or a local file/glob/folder as a DocumentSource; a DataError says what is wrong."""
    if spec in CATALOG and not Path(spec).exists():
        entry = dataset_entry(spec)
        if spec == EMBEDDED:
            raise DataError("'shakespeare' is the embedded default: train on it with data.dataset=shakespeare "
                            "(it is prepared automatically); it is not streamed")
        return hub_source(entry, text_field=text_field)
    if not looks_like_path(spec):
        dataset_entry(spec)  # raises the "unknown dataset" message with the known names
    files = _expand(spec)
    if not files:
        raise DataError(f"no input files at {spec!r}: give an existing .txt/.jsonl/.json/.parquet file, a glob "
                        "(quote it) or a folder that contains such files")
    suffixes = {f.suffix.lower() for f in files}
    unknown = suffixes - set(BUILDERS)
    if unknown:
        raise DataError(f"{spec!r}: files with suffix {', '.join(sorted(unknown))} are not supported; use "
                        f"{', '.join(sorted(BUILDERS))}")
    builders = {BUILDERS[s] for s in suffixes}
    if len(builders) > 1:
        raise DataError(f"{spec!r} mixes formats ({', '.join(sorted(suffixes))}); give one source per format "
                        "(data.sources takes several)")
    return DocumentSource(name=spec, builder=builders.pop(), data_files=tuple(str(f) for f in files),
                          text_field=text_field or "text")


def hub_source(entry: DatasetEntry, *, text_field: str | None = None) -> DocumentSource:
    """The Hub dataset of a catalog entry."""
    return DocumentSource(name=entry.name, builder=entry.hub_id, config=entry.config, data_dir=entry.data_dir,
                          split=entry.split, text_field=text_field or entry.text_field)


def check_hub_reachable() -> None:
    """Fail within seconds, with what to do, when the Hub cannot be reached (or HF_HUB_OFFLINE is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise DataError(f"HF_HUB_OFFLINE is set, so no dataset can be downloaded; {OFFLINE_HINT}")
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=NETWORK_PROBE_TIMEOUT_S).close()
    except OSError as err:
        raise DataError(f"no network: cannot reach {host}:{port} ({err}); {OFFLINE_HINT}") from None


def _check_utf8(files: tuple[str, ...]) -> None:
    # The text builder would die deep inside pyarrow/codecs with a traceback; name the file instead.
    for name in files:
        with open(name, "rb") as handle:
            offset = 0
            decoder = codecs.getincrementaldecoder("utf-8")()
            while chunk := handle.read(1 << 20):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as err:
                    raise DataError(f"{name} is not UTF-8 text (bad byte at offset {offset + err.start}); "
                                    "convert it, e.g. `iconv -f GB18030 -t UTF-8`") from None
                offset += len(chunk)


_READ_BATCH_ROWS = 64
"""Rows datasets hands over at once (small: a resume skips whole rows, and a batch is held in memory)."""


def iter_documents(source: DocumentSource, *, skip: int = 0) -> Iterator[str]:
    """The source's documents in a fixed order, streamed (never all in memory), after the first `skip` rows."""
    return (text for text in iter_rows(source, skip=skip) if text is not None)


def iter_rows(source: DocumentSource, *, skip: int = 0) -> Iterator[str | None]:
    """Every row's text after the first `skip` rows, None for a row whose text is not a string (null, a number, a
    list): one item per row, so that a position counted over these items is a row number, which is what
    `skip` skips when an interrupted preprocessing run resumes."""
    import datasets

    if source.is_local:
        missing = [f for f in source.data_files if not Path(f).is_file()]
        if missing:
            raise DataError(f"input file {missing[0]} does not exist")
        empty = [f for f in source.data_files if Path(f).stat().st_size == 0]
        if len(empty) == len(source.data_files):
            # datasets' json builder leaks a StopIteration on an empty file; say what is wrong instead.
            raise DataError(f"{source.name}: no documents (the input file{'s are' if len(empty) > 1 else ' is'} "
                            "empty)")
        if source.builder == "text":
            _check_utf8(source.data_files)
        kwargs = {"data_files": list(source.data_files)}
        if source.builder == "text":
            kwargs["sample_by"] = "document"  # a whole file is one document, as a book or article should be
        if source.builder == "json":
            # 1 MB of JSON lines parsed at a time instead of datasets' 10 MB: the first documents reach the workers
            # after 0.05 s instead of 0.25 s, and no 10 MB parse (~0.1 s) holds up a worker waiting for text.
            kwargs["chunksize"] = 1 << 20
    else:
        check_hub_reachable()
        kwargs = {"name": source.config, "data_dir": source.data_dir}
    datasets.logging.set_verbosity_error()
    try:
        stream = datasets.load_dataset(source.builder, split=source.split, streaming=True, **kwargs)
        if skip:
            stream = stream.skip(skip)
        # Batches of rows, not rows: datasets formats a Python dict per row, which cost the preprocessing main
        # process twice the time of reading Arrow batches (40 MB of JSON lines: 0.37 s against 0.18 s).
        for batch in stream.iter(batch_size=_READ_BATCH_ROWS):
            if source.text_field not in batch:
                raise DataError(f"{source.name}: documents have no field {source.text_field!r} (fields: "
                                f"{', '.join(batch)}); pass the right one with --text_field (data.sources: "
                                "text_field)")
            for text in batch[source.text_field]:
                yield text if isinstance(text, str) else None
    except DataError:
        raise
    except (ConnectionError, TimeoutError) as err:
        raise DataError(f"{source.name}: network failed while streaming ({err}); rerun the same command to "
                        f"resume, or {OFFLINE_HINT}") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{source.name}: a file is not UTF-8 ({err})") from None
    except Exception as err:  # datasets/pyarrow raise many types for a malformed file or a missing dataset
        kind = type(err).__name__
        if "NotFound" in kind or "FileNotFound" in kind:
            raise DataError(f"{source.name}: not found ({err})") from None
        if "ArrowInvalid" in kind or "JSON" in kind or "DatasetGenerationError" in kind:
            raise DataError(f"{source.name}: cannot parse the input ({kind}: {str(err)[:300]}); check the file "
                            "format") from None
        raise
