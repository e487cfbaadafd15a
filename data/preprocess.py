"""Parallel preprocessing of a document stream into a folder of Megatron `.bin/.idx` token shards.

Output folder: `tokenizer.model` (a copy), `train_NNNNN.bin/.idx` and `val_NNNNN.bin/.idx` shard pairs,
`meta.json` (written last). The set is built in a staging folder beside the output, `.<name>.partial`, and renamed
to its name only when complete (data/output.py's rules: an existing output is replaced only with `overwrite`, never
a folder holding files a shard set does not have, a checkpoint or the input). While running, `progress.json` and
`dedup_hashes.npy` in the staging folder record what the finished shard pairs hold, so an interrupted run resumes
after them; a shard being written lives under a temporary name (TokenShardWriter).

Documents go to validation by a hash of their text (not their position), so the split does not depend on the
order, the number of workers or a resume. Exact duplicates (same text) are dropped by that hash.
"""
from __future__ import annotations

import collections
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.errors import DataError
from data.output import check_output, name_matcher, publish
from data.shards import TokenShardWriter, token_dtype
from data.corpora.sources import DocumentSource, check_hub_reachable, iter_rows
from data.tokenizer import Tokenizer

SHARD_SET_FORMAT = "rag-transformer-shards"
SHARD_SET_VERSION = 1
META_FILE, PROGRESS_FILE, HASHES_FILE, TOKENIZER_FILE = "meta.json", "progress.json", "dedup_hashes.npy", \
    "tokenizer.model"
SHARD_SET_FILES = name_matcher(r"(?:train|val)_\d+\.(?:bin|idx)", re.escape(META_FILE), re.escape(PROGRESS_FILE),
                               re.escape(HASHES_FILE), re.escape(TOKENIZER_FILE), r".*\.tmp-.*")
"""What a shard set's folder (complete or being written) holds."""
# Hash values below this fraction of 2**64 go to validation.
_HASH_RANGE = 2 ** 64


@dataclass(frozen=True, kw_only=True)
class PreprocessOptions:
    """How to turn documents into shards."""

    output_dir: Path
    """Folder of the shard set (created; resumed when it holds an interrupted run of the same settings)."""
    tokenizer_path: Path
    """SentencePiece model used to encode (copied into the folder; its SHA-256 goes into meta.json)."""
    num_workers: int = 1
    """Worker processes that tokenize."""
    val_fraction: float = 0.01
    """Expected fraction of documents held out for validation (chosen by text hash)."""
    max_shard_tokens: int = 1 << 28
    """A shard pair is closed once its training shard reaches this many tokens (2^28 uint16 = 512 MiB)."""
    max_tokens: int | None = None
    """Stop after this many tokens (training + validation); None reads the whole source."""
    dedup: bool = True
    """Drop documents whose exact text was seen before."""
    task_bytes: int = 1 << 18
    """Text sent to a worker at once: a task closes at the first document that reaches this many characters.
    ~256 KB: the hand-off costs per task, so tasks of short documents (TinyStories' ~800 bytes) must hold many;
    smaller than 1 MB, so the last tasks leave a worker idle for less (on 20 MB, 4% faster than 1 MB tasks)."""
    progress: bool = True
    """Show a progress bar."""
    overwrite: bool = False
    """Replace an existing shard set made with other settings (never a folder holding other files)."""


def _document_hash(text: str) -> tuple[int, int]:
    # 16 bytes of BLAKE2b: the first 8 identify the text for deduplication, the last 8 pick the split.
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(tokenizer_path)


def _encode_task(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Encode texts, eos after each; returns (all tokens concatenated, per-document lengths)."""
    tokenizer = _worker_tokenizer
    ids = tokenizer.encode_batch(texts, add_eos=True)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    # chain.from_iterable flattens in C: a Python generator here cost half of the worker's time.
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=token_dtype(tokenizer.vocab_size),
                         count=int(lengths.sum()))
    return tokens, lengths


def _write_json(path: Path, value: dict) -> None:
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(temp, path)


def read_shard_set_meta(folder: Path) -> dict | None:
    """meta.json of a complete shard set, or None."""
    try:
        return json.loads((Path(folder) / META_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


class _ShardPairs:
    """The train/val writers of the current shard pair, and the bookkeeping that makes finished pairs resumable."""

    def __init__(self, folder: Path, vocab_size: int, settings: dict, state: dict, hashes: np.ndarray):
        self.folder, self.vocab_size, self.settings, self.state = folder, vocab_size, settings, state
        self.written_hashes = [hashes]
        self.pending_hashes: list[int] = []
        self.not_text_positions: list[int] = []
        """Rows read whose text is not a string, not yet recorded in state (they may lie past the next record)."""
        self.train = self.val = None

    def _open(self) -> None:
        index = self.state["num_shard_pairs"]
        self.train = TokenShardWriter(self.folder / f"train_{index:05d}", self.vocab_size)
        self.val = TokenShardWriter(self.folder / f"val_{index:05d}", self.vocab_size)

    def add(self, tokens: np.ndarray, *, is_val: bool, dedup_hash: int, position: int, max_shard_tokens: int) -> None:
        if self.train is None:
            self._open()
        elif not is_val and self.train.num_tokens and self.train.num_tokens + len(tokens) > max_shard_tokens:
            self.close_pair(next_position=position)
            self._open()
        (self.val if is_val else self.train).add_document(tokens)
        self.pending_hashes.append(dedup_hash)
        key = "val" if is_val else "train"
        self.state[f"num_{key}_tokens"] += len(tokens)
        self.state[f"num_{key}_documents"] += 1

    def close_pair(self, *, next_position: int) -> None:
        """Finalize the current pair and record that documents before next_position are done."""
        if self.train is None:
            return
        self.train.finalize()
        self.val.finalize()
        self.train = self.val = None
        self.state["num_shard_pairs"] += 1
        self.state["num_documents_read"] = next_position
        self.state["num_rows_not_text"] += sum(1 for p in self.not_text_positions if p < next_position)
        self.not_text_positions = [p for p in self.not_text_positions if p >= next_position]
        self.written_hashes.append(np.asarray(self.pending_hashes, dtype=np.uint64))
        self.pending_hashes = []
        hashes = np.concatenate(self.written_hashes)
        self.written_hashes = [hashes]
        temp = self.folder / f".{HASHES_FILE}.tmp-{os.getpid()}.npy"
        np.save(temp, hashes)
        os.replace(temp, self.folder / HASHES_FILE)
        _write_json(self.folder / PROGRESS_FILE, {**self.settings, **self.state})

    def abort(self) -> None:
        for writer in (self.train, self.val):
            if writer is not None:
                writer.abort()


def _load_state(folder: Path, settings: dict) -> tuple[dict, np.ndarray]:
    fresh = {"num_shard_pairs": 0, "num_documents_read": 0, "num_train_tokens": 0, "num_val_tokens": 0,
             "num_train_documents": 0, "num_val_documents": 0, "num_rows_not_text": 0}
    progress_path = folder / PROGRESS_FILE
    if not progress_path.is_file():
        return fresh, np.zeros(0, dtype=np.uint64)
    saved = json.loads(progress_path.read_text())
    changed = [key for key, value in settings.items() if saved.get(key) != value]
    if changed:
        raise DataError(f"{folder} holds an interrupted run with other settings ({', '.join(changed)} differ); "
                        "rerun with the same settings to resume, or choose another --output (or delete it)")
    state = {key: int(saved.get(key, 0)) for key in fresh}  # num_rows_not_text: absent in older progress files
    hashes = np.load(folder / HASHES_FILE) if (folder / HASHES_FILE).is_file() else np.zeros(0, dtype=np.uint64)
    return state, hashes


def _remove_leftovers(folder: Path, num_pairs: int) -> None:
    """Temporary files of a killed run, and shards finalized after its last recorded pair."""
    for path in folder.iterdir():
        if ".tmp-" in path.name:
            path.unlink(missing_ok=True)
            continue
        stem, _, number = path.stem.partition("_")
        if stem in ("train", "val") and number.isdigit() and int(number) >= num_pairs:
            path.unlink(missing_ok=True)


def preprocess(source: DocumentSource, options: PreprocessOptions) -> dict:
    """Tokenize source into a shard set at options.output_dir (resuming an interrupted run); returns meta.json."""
    if options.num_workers < 1:
        raise DataError(f"--workers must be >= 1, got {options.num_workers}")
    if not 0.0 <= options.val_fraction < 1.0:
        raise DataError(f"--val_fraction must be in [0, 1), got {options.val_fraction}")
    if not Path(options.tokenizer_path).is_file():
        raise DataError(f"tokenizer model {options.tokenizer_path} does not exist; train one with "
                        "tools/train_tokenizer.py or pass an existing SentencePiece .model")
    if not source.is_local:
        check_hub_reachable()  # before any folder, worker or progress bar exists
    tokenizer = Tokenizer(options.tokenizer_path)
    folder = Path(options.output_dir)
    settings = {"format": SHARD_SET_FORMAT, "format_version": SHARD_SET_VERSION, "source": source.name,
                "data_files": list(source.data_files), "text_field": source.text_field,
                "tokenizer_sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size,
                "val_fraction": options.val_fraction, "dedup": options.dedup,
                "max_shard_tokens": options.max_shard_tokens, "max_tokens": options.max_tokens}
    meta = read_shard_set_meta(folder)
    if meta is not None and all(meta.get(key) == value for key, value in settings.items()):
        return meta  # already complete
    rules = dict(overwrite=options.overwrite, inputs=[*source.data_files, options.tokenizer_path],
                 owned=SHARD_SET_FILES, folder=True)
    if meta is not None and not options.overwrite:
        raise DataError(f"{folder} already holds a finished shard set made with other settings; choose another "
                        "--output, or pass --overwrite to replace it")
    staging = resumable_staging(folder)
    if meta is None and (folder / PROGRESS_FILE).is_file() and not staging.exists():
        staging = folder  # an interrupted run of an earlier version, which built in place: resumed there
    else:
        check_output(folder, **rules)
    if staging.exists():
        check_output(staging, overwrite=True, inputs=rules["inputs"], owned=SHARD_SET_FILES, folder=True,
                     what="the staging folder of --output")
    created = not staging.exists()
    staging.mkdir(parents=True, exist_ok=True)
    state, hashes = _load_state(staging, settings)
    _remove_leftovers(staging, state["num_shard_pairs"])
    if not (staging / TOKENIZER_FILE).is_file():
        temp = staging / f".{TOKENIZER_FILE}.tmp-{os.getpid()}"
        shutil.copyfile(options.tokenizer_path, temp)
        os.replace(temp, staging / TOKENIZER_FILE)
    try:
        _run(source, options, tokenizer, staging, settings, state, hashes)
    except BaseException:
        if created and state["num_shard_pairs"] == 0:
            shutil.rmtree(staging, ignore_errors=True)  # nothing worth resuming: leave nothing behind
        raise
    meta = {**settings, **state, "num_documents_skipped": state["num_documents_read"]
            - state["num_train_documents"] - state["num_val_documents"] - state["num_rows_not_text"],
            "eos_id": tokenizer.eos_id, "bos_id": tokenizer.bos_id,
            "dtype": np.dtype(token_dtype(tokenizer.vocab_size)).name,
            "train_shards": [f"train_{i:05d}" for i in range(state["num_shard_pairs"])],
            "val_shards": [f"val_{i:05d}" for i in range(state["num_shard_pairs"])]}
    _write_json(staging / META_FILE, meta)
    (staging / PROGRESS_FILE).unlink(missing_ok=True)
    (staging / HASHES_FILE).unlink(missing_ok=True)
    if staging != folder:
        publish(staging, folder, **rules)
    return meta


def resumable_staging(folder: Path) -> Path:
    """Where the shard set for `folder` is built: a fixed name beside it, so a rerun finds an interrupted run."""
    return folder.with_name(f".{folder.name}.partial")


def _run(source: DocumentSource, options: PreprocessOptions, tokenizer: Tokenizer, folder: Path, settings: dict,
         state: dict, hashes: np.ndarray) -> None:
    seen = set(hashes.tolist())  # ~70 bytes per document: the one part of memory that grows with the corpus
    val_threshold = int(options.val_fraction * _HASH_RANGE)
    pairs = _ShardPairs(folder, tokenizer.vocab_size, settings, state, hashes)
    start_position = state["num_documents_read"]
    num_tokens = state["num_train_tokens"] + state["num_val_tokens"]
    # Opened with the first result, so that an input rejected at its first document prints only the error.
    bar, started = None, time.time()

    num_read = [start_position]

    def batches():
        """(texts, [(is_val, dedup_hash, position)]) of new documents, about task_bytes characters a task."""
        texts, info, size = [], [], 0
        for position, text in enumerate(iter_rows(source, skip=start_position), start=start_position):
            num_read[0] = position + 1
            if text is None:  # its text is not a string: counted (meta num_rows_not_text), not tokenized
                pairs.not_text_positions.append(position)
                continue
            if not text.strip():
                continue
            dedup_hash, split_hash = _document_hash(text)
            if options.dedup:
                if dedup_hash in seen:
                    continue
                seen.add(dedup_hash)
            texts.append(text)
            info.append((split_hash < val_threshold, dedup_hash, position))
            size += len(text)
            if size >= options.task_bytes:
                yield texts, info
                texts, info, size = [], [], 0
        if texts:
            yield texts, info

    context = multiprocessing.get_context("spawn" if os.name != "posix" else "fork")
    pool = context.Pool(options.num_workers, initializer=_init_worker, initargs=(str(options.tokenizer_path),))
    in_flight: collections.deque = collections.deque()
    next_position, finished = start_position, False
    try:
        tasks = batches()
        while not finished:
            # At most 2 tasks per worker in flight: memory stays bounded however big the corpus is.
            while len(in_flight) < 2 * options.num_workers:
                task = next(tasks, None)
                if task is None:
                    break
                in_flight.append((pool.apply_async(_encode_task, (task[0],)), task[1]))
            if not in_flight:
                break
            result, info = in_flight.popleft()
            tokens, lengths = result.get()
            if bar is None:
                bar = tqdm(total=options.max_tokens, initial=num_tokens, unit="tok", unit_scale=True,
                           desc=source.name, disable=not options.progress, dynamic_ncols=True, mininterval=1.0)
                bar.start_t = started  # rates count from the start of reading, not from the first result
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            for (is_val, dedup_hash, position), start, stop in zip(info, offsets[:-1], offsets[1:]):
                pairs.add(tokens[start:stop], is_val=is_val, dedup_hash=dedup_hash, position=position,
                          max_shard_tokens=options.max_shard_tokens)
                next_position = position + 1
                num_tokens += int(stop - start)
                if options.max_tokens is not None and num_tokens >= options.max_tokens:
                    finished = True
                    break
            bar.update(int(offsets[-1]) if not finished else num_tokens - bar.n)
            bar.set_postfix(docs=state["num_train_documents"] + state["num_val_documents"], refresh=False)
        if not finished:
            next_position = max(next_position, num_read[0])
        if state["num_train_documents"] + state["num_val_documents"] == 0:
            raise DataError(f"{source.name}: no documents with text (the input is empty, or every document is "
                            "blank); check the files and --text_field")
        if state["num_train_tokens"] == 0:
            raise DataError(f"{source.name}: every document went to validation; lower --val_fraction or add data")
        pairs.close_pair(next_position=next_position)
    except BaseException:
        pairs.abort()
        pool.terminate()
        raise
    finally:
        if bar is not None:
            bar.close()
        pool.close()
        pool.join()

