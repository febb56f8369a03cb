"""Documents as TFDS datasets in ArrayRecord format, read by random access without TensorFlow.

Local sources (`stdlib`, `text_dir:PATH`) are written once into the cache as the TFDS dataset
`gptjax_documents` (splits `train` and `validation`; features `name` and `text`): the
`DatasetInfo` of a `GeneratorBasedBuilder` (made directly, so TensorFlow is never imported), the
records streamed in source order by `tfds.core.SequentialWriter` in ArrayRecord format, a batch
at a time. (`download_and_prepare` would hold every serialized example in memory until the end,
up to 1 GB, and then all of them again to sort: memory grew with the corpus.)
`tfds:NAME[/CONFIG][:VERSION]` reads a dataset the user already
prepared (in ArrayRecord format) in their TFDS data dir. Both are opened through TFDS data
sources (`builder.as_data_source`, what `tfds.data_source` calls).

Text field of a `tfds:` dataset: `text` when it is a string feature, otherwise the only string
feature; anything else is an error. Validation split: `validation`, else `test`, else a
deterministic `val_fraction` of `train` chosen by a hash of the record index.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

import gptjax.data.corpus as corpus
from gptjax.data.corpus import DataError

BUILDER_NAME = "gptjax_documents"
BUILDER_VERSION = "1.0.0"
FORMAT_VERSION = 2
WRITE_DOCUMENTS = 1024  # documents handed to the TFDS writer per call
WRITE_BYTES = 8 << 20  # ... or this much text, whichever comes first
SHARD_DOCUMENTS = 1 << 16  # documents per ArrayRecord shard
log = logging.getLogger("gptjax")


def _tfds():
    import tensorflow_datasets as tfds  # lazy: only the data feature needs it

    tfds.disable_progress_bar()  # ours (tqdm) is shown instead
    return tfds


@functools.cache
def _builder_class():
    tfds = _tfds()

    class GptjaxDocuments(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """The dataset's identity and features; `write_local` writes its splits."""

        VERSION = tfds.core.Version(BUILDER_VERSION)
        code_path = None  # no checksums file to look up (and no importlib_resources needed)

        def _info(self):
            text = tfds.features.Text()
            return tfds.core.DatasetInfo(
                builder=self,
                description="gptjax documents (name, text) of one local source",
                features=tfds.features.FeaturesDict({"name": text, "text": text}),
                disable_shuffling=True,  # keep the source order; the loader shuffles windows
            )

        def _split_generators(self, dl_manager):  # pragma: no cover - never prepared by TFDS
            raise NotImplementedError("written by documents.write_local")

        def _generate_examples(self):  # pragma: no cover
            raise NotImplementedError("written by documents.write_local")

    return GptjaxDocuments


def write_splits(writer, documents, val_fraction: float, on_document) -> None:
    """Stream both splits of `documents` into `writer` (a tfds.core.SequentialWriter, or
    anything with `add_examples`), at most WRITE_DOCUMENTS documents / WRITE_BYTES of text per
    call, so memory holds one batch whatever the corpus size."""
    for split, validation in (("train", False), ("validation", True)):
        batch: list[dict] = []
        size = count = 0
        for name, text in corpus.split_documents(documents(), val_fraction, validation):
            count += 1
            n = len(text.encode())
            if not validation:
                on_document(n)
            batch.append({"name": name, "text": text})
            size += n
            if len(batch) >= WRITE_DOCUMENTS or size >= WRITE_BYTES:
                writer.add_examples({split: batch})
                batch, size = [], 0
        if batch:
            writer.add_examples({split: batch})
        if count == 0 and not validation:
            raise DataError("the corpus has fewer than 2 non-empty documents: nothing to train")


def atomic_dir(target: Path, build: Callable[[Path], None]) -> Path:
    """Build into a temporary sibling directory, then rename it to `target` (all or nothing)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        build(scratch)
        try:
            scratch.rename(target)
        except OSError:  # another process finished first: keep theirs
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def write_local(documents, val_fraction: float, target: Path, progress: bool = False) -> Path:
    """Write a local source's documents (a callable returning an iterator of (name, text)) to
    `target` as the TFDS dataset; returns its directory."""
    tfds = _tfds()
    bar = None
    if progress:
        from gptjax import progress as progress_display

        bar = progress_display.bar("documents", unit="B", unit_scale=True, leave=False)

    def build(scratch: Path) -> None:
        builder = _builder_class()(data_dir=str(scratch), file_format="array_record")
        Path(builder.info.data_dir).mkdir(parents=True)
        writer = tfds.core.SequentialWriter(
            builder.info, max_examples_per_shard=SHARD_DOCUMENTS, file_format="array_record"
        )
        writer.initialize_splits(["train", "validation"])
        write_splits(writer, documents, val_fraction, bar.update if bar else lambda n: None)
        writer.close_all()

    try:
        return atomic_dir(target, build)
    finally:
        if bar is not None:
            bar.close()


class Split:
    """One split of documents: random access to decoded texts.

    `keep`, when given, maps an int64 array of record indices to a bool mask of those that
    belong to this split (a hold-out taken out of a larger split).
    """

    def __init__(self, data_source, field: str, label: str, keep=None):
        self.source = data_source
        self.field = field
        self.label = label
        self.keep = keep

    def __len__(self) -> int:
        """Records in the underlying split (an upper bound when `keep` filters them)."""
        return len(self.source)

    def texts(self, indices: np.ndarray) -> list[str]:
        if self.keep is not None:
            indices = indices[self.keep(indices)]
        # One record at a time, in this thread: the data source's batched read starts a new
        # thread pool on every call, and each new thread may get another malloc arena that
        # keeps what it allocated (memory crept up with the number of calls).
        records = [self.source[int(i)] for i in indices]
        out = []
        for index, record in zip(indices, records, strict=True):
            value = record[self.field]
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError:
                    raise DataError(
                        f"{self.label} record {index}: field {self.field!r} is not UTF-8"
                    ) from None
            out.append(value)
        return out

    def chunks(self, size: int = 256, limit: int | None = None) -> Iterator[list[str]]:
        """Texts in record order, `size` records at a time; at most `limit` documents."""
        seen = 0
        for start in range(0, len(self), size):
            texts = self.texts(np.arange(start, min(start + size, len(self)), dtype=np.int64))
            if limit is not None:
                texts = texts[: limit - seen]
            seen += len(texts)
            if texts:
                yield texts
            if limit is not None and seen >= limit:
                return


def _holdout(val_fraction: float, validation: bool):
    """Record index -> in the held-out part? (a multiplicative hash; stable, vectorised)."""

    def keep(indices: np.ndarray) -> np.ndarray:
        mixed = (indices.astype(np.uint64) * np.uint64(0x9E3779B1)) % np.uint64(2**32)
        held = mixed < np.uint64(int(val_fraction * 2**32))
        return held if validation else ~held

    return keep


class Documents:
    """A source's train and validation splits, opened (and for local sources written) on first
    use: when the packed windows are already cached, the documents are never touched."""

    def __init__(self, description: str, key: str, open_splits: Callable[[], tuple[Split, Split]]):
        self.description = description
        self.key = key  # changes whenever the documents (or their split) change
        self._open_splits = open_splits

    @functools.cached_property
    def _splits(self) -> tuple[Split, Split]:
        return self._open_splits()

    @property
    def train(self) -> Split:
        return self._splits[0]

    @property
    def val(self) -> Split:
        return self._splits[1]


def _is_string(feature) -> bool:
    """A scalar string feature (tfds.features.Text or a string Tensor of shape ())."""
    dtype = getattr(feature, "np_dtype", None)
    return getattr(feature, "shape", None) == () and dtype is not None and np.dtype(dtype) == object


def _text_field(features, label: str) -> str:
    strings = [name for name, feature in features.items() if _is_string(feature)]
    if "text" in strings:
        return "text"
    if len(strings) == 1:
        return strings[0]
    raise DataError(
        f"{label}: no string feature 'text' and not exactly one string feature "
        f"(features: {', '.join(sorted(features.keys()))})"
    )


def _version_key(path: Path) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in path.name.split("."))
    except ValueError:
        return (-1,)


def tfds_data_dir(configured: str | None) -> Path:
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser()


def find_tfds(spec: str, data_dir: Path) -> Path:
    """The prepared dataset directory of `NAME[/CONFIG][:VERSION]` in `data_dir`."""
    name_config, _, version = spec.partition(":")
    base = data_dir / name_config
    if version:
        found = base / version
        candidates = [found] if (found / "dataset_info.json").is_file() else []
    else:
        dirs = base.iterdir() if base.is_dir() else []
        candidates = [d for d in dirs if (d / "dataset_info.json").is_file()]
    if not candidates:
        name = name_config.split("/")[0]
        raise DataError(
            f"tfds:{spec} is not prepared in {data_dir}: run `tfds build {name} "
            f"--file_format=array_record --data_dir={data_dir}` or set data.tfds_data_dir"
        )
    return max(candidates, key=_version_key)


def _fingerprint_dir(directory: Path) -> str:
    digest = hashlib.sha256(str(directory.resolve()).encode())
    digest.update((directory / "dataset_info.json").read_bytes())
    for path in sorted(directory.iterdir()):
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def open_tfds(spec: str, data_dir: Path, val_fraction: float) -> Documents:
    tfds = _tfds()
    directory = find_tfds(spec, data_dir)
    label = f"tfds:{spec}"
    builder = tfds.builder_from_directory(str(directory))
    file_format = builder.info.file_format
    if file_format is None or "array_record" not in str(getattr(file_format, "value", "")):
        raise DataError(
            f"{label} ({directory}) is stored as {getattr(file_format, 'value', 'tfrecord')}; "
            f"random access needs ArrayRecord: rebuild it with --file_format=array_record"
        )
    field = _text_field(builder.info.features, label)
    splits = list(builder.info.splits)
    if "train" not in splits:
        raise DataError(f"{label} has no 'train' split (splits: {', '.join(splits)})")
    train_source = builder.as_data_source(split="train")
    held_out = next((s for s in ("validation", "test") if s in splits), None)
    if held_out is None:
        train = Split(train_source, field, f"{label} train", _holdout(val_fraction, False))
        val = Split(train_source, field, f"{label} train", _holdout(val_fraction, True))
    else:
        train = Split(train_source, field, f"{label} train")
        val_source = builder.as_data_source(split=held_out)
        val = Split(val_source, field, f"{label} {held_out}")
    key = {"tfds": _fingerprint_dir(directory), "field": field, "held_out": held_out}
    if held_out is None:
        key["val_fraction"] = val_fraction
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return Documents(f"{label} ({directory}, field {field!r})", digest, lambda: (train, val))


def open_documents(cfg, cache_root: Path, progress: bool = False) -> Documents:
    """The train and validation documents of `cfg.source` (a DataConfig), through the source
    registry; a local source's documents are written to the cache once."""
    from gptjax.data.sources import parse

    entry, argument = parse(cfg.source)
    module = entry.load()
    if hasattr(module, "open"):  # a prepared dataset
        return module.open(argument, cfg)
    parts = {
        "format": FORMAT_VERSION,
        "source": cfg.source,
        "files": module.fingerprint(argument),
        "val_fraction": cfg.val_fraction,
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    target = cache_root / "documents" / key[:20]
    documents = module.documents(argument)

    def open_splits() -> tuple[Split, Split]:
        written = not target.is_dir()
        if written:
            write_local(documents, cfg.val_fraction, target, progress)
        builder = _tfds().builder_from_directory(str(target / BUILDER_NAME / BUILDER_VERSION))
        if written and hasattr(module, "describe_split"):  # e.g. how one file became documents
            counts = (builder.info.splits[split].num_examples for split in ("train", "validation"))
            line = module.describe_split(argument, *counts)
            if line:
                log.info(line)
        train = Split(builder.as_data_source(split="train"), "text", f"{cfg.source} train")
        val = Split(builder.as_data_source(split="validation"), "text", f"{cfg.source} validation")
        return train, val

    return Documents(cfg.source, key, open_splits)
