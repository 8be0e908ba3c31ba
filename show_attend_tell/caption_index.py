"""A full-text index of what a captioning model says about every picture of a collection.

Text-to-image search by caption likelihood (:mod:`show_attend_tell.retrieval`) runs the decoder once per
picture and query: exact, but hours per query over a million pictures. Captioning every picture once
(its n-best beam-search captions) and indexing the words turns a query into a BM25 lookup of a few
milliseconds; the model then re-ranks only the index's top candidates (:class:`IndexedRetriever` in
``retrieval``).

The engine is tantivy, an embedded Lucene-like library (files in one folder, nothing to start). It was
chosen by measurement (``benchmarks/bench_search.py``, ``../shared/PITFALLS.md``): over a million caption
rows it answers an OR of a user's words in milliseconds, where SQLite FTS5 scores every matching row and
takes a third of a second.

How a query is matched. Captions and queries are cut into the same words (NFKC, lower case, no
punctuation: what the model's tokenizer does), common function words are dropped, and each picture is
indexed under its words and under the runs of two and three consecutive words (``red_circle``,
``small_red_circle``). A query first asks for pictures sharing a run of three of its words, then of two,
then single words, each step only while fewer than ``limit`` pictures were found: a picture described as
"a small red circle" outranks one that has "red" and "circle" in different places, and the common single
words, which match a large part of a collection, are only read when the phrases run out. Every term is
made from words we produced (never the user's text handed to a query parser), so quotes, ``*``, ``-``,
``:``, ``NEAR``, ``AND``/``OR``/``NOT`` and parentheses are plain text.

Durability: pictures are added and removed in batches, one tantivy commit per batch; a process killed
mid-batch leaves the index as it was after the last commit. The index records the model that captioned
it (a fingerprint of its weights and tokenizer, and the generation settings) in ``index.json`` and
refuses to be extended or searched with another model.

The interface is the one class :class:`CaptionIndex` (create/open, add, remove, search, len): a
backend on a server engine (PostgreSQL full-text search, OpenSearch) would be another class with the
same methods.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic_files import write_text_atomic
from .errors import one_line

__all__ = [
    "STOP_WORDS",
    "CaptionIndex",
    "CaptionIndexError",
    "IndexHit",
    "IndexModelMismatchError",
    "IndexedPicture",
    "pictures_from_caption_rows",
    "query_terms",
]

#: Written into ``index.json``; bumped when the layout or the term analysis changes.
INDEX_FORMAT = "show_attend_tell.caption_index.v1"
META_FILE = "index.json"
ENGINE_DIR = "tantivy"

#: Function words that say nothing about a picture. Every caption has several of them, so a query
#: term like "a" would match (and score) the whole collection.
STOP_WORDS: frozenset[str] = frozenset(
    (  # noqa: SIM905 - a line of words reads better than 32 lines
        "a an the of to in on at is are was were be been being and or with "
        "there this that these those it its by for from as into onto some"
    ).split()
)
#: The longest run of consecutive words indexed as one term.
MAX_PHRASE = 3
#: Queries keep their first words up to this many (a pasted paragraph is not a search).
MAX_QUERY_WORDS = 64
DEFAULT_BATCH_SIZE = 10_000  # pictures per commit
_WRITER_HEAP = 128_000_000  # bytes of tantivy's indexing buffer (one thread)
_WORD = re.compile(r"[^\W_]+")


class CaptionIndexError(ValueError):
    """The index is missing, damaged, busy or used wrongly; the message is one line meant for the user."""


class IndexModelMismatchError(CaptionIndexError):
    """The index was built with another model or other generation settings."""


@dataclass(frozen=True)
class IndexedPicture:
    """
    One picture as the index stores it.

    Attributes:
        image_id: the picture's key (its path as given to the build, or a dataset's ``image_id``); unique.
        captions: its n-best captions, best first.
        source: where to read the picture again for re-ranking (an absolute path or a URL), if known.
    """

    image_id: str
    captions: tuple[str, ...]
    source: str | None = None


@dataclass(frozen=True)
class IndexHit:
    """A picture found by :meth:`CaptionIndex.search`: ``phrase`` is the longest run of query words it matched."""

    image_id: str
    score: float
    phrase: int
    captions: tuple[str, ...]
    source: str | None


@dataclass
class _Analysis:
    words: list[str]
    ignored: list[str] = field(default_factory=list)  # stop words, left out


def _words(text: str) -> list[str]:
    """Lower-case words without punctuation, as the model's tokenizer cuts captions."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def _analyse(text: str) -> _Analysis:
    words = _words(text)
    return _Analysis([w for w in words if w not in STOP_WORDS], [w for w in words if w in STOP_WORDS])


def _phrases(words: Sequence[str], n: int) -> list[str]:
    """The runs of ``n`` consecutive words, joined by ``_`` (which no word contains), each once."""
    return list(dict.fromkeys("_".join(words[i : i + n]) for i in range(len(words) - n + 1)))


def query_terms(text: str) -> dict[int, list[str]]:
    """
    The index terms a query looks for, by phrase length: ``{3: [...], 2: [...], 1: [...]}`` (lengths with
    no term left out). Stop words are dropped first; at most :data:`MAX_QUERY_WORDS` words are used.
    """
    words = _analyse(text).words[:MAX_QUERY_WORDS]
    terms = {n: _phrases(words, n) for n in range(MAX_PHRASE, 0, -1)}
    return {n: found for n, found in terms.items() if found}


def _document_terms(captions: Sequence[str]) -> str:
    """The terms of a picture, space separated (the engine splits on whitespace only)."""
    terms: list[str] = []
    for caption in captions:
        words = _analyse(caption).words
        for n in range(1, MAX_PHRASE + 1):
            # Repeats are kept: a word in all five captions is more certain than a word in one (BM25's tf).
            terms.extend("_".join(words[i : i + n]) for i in range(len(words) - n + 1))
    return " ".join(terms)


def _id_term(image_id: str) -> str:
    """
    The engine's key for an id. A file name that is not UTF-8 reaches Python with lone surrogates (its
    bytes escaped), which the engine cannot store: such an id is keyed by its bytes in hex instead, and the
    id itself travels in the stored JSON, which escapes them losslessly.
    """
    try:
        image_id.encode("utf-8")
    except UnicodeEncodeError:
        return "\0bytes:" + image_id.encode("utf-8", "surrogateescape").hex()
    return image_id


def _describe_model(model: Mapping[str, Any]) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in sorted(model.get("generation", {}).items()))
    return f"model {str(model.get('fingerprint', '?'))[:12]} ({settings or 'no settings'})"


class CaptionIndex:
    """
    The captions of a picture collection in an embedded BM25 full-text index (a folder on disk).

    Create one with :meth:`create`, open it again with :meth:`open`. ``model`` is a JSON-able record of
    what captioned the pictures: ``{"fingerprint": <hex digest of the weights>, "generation": {...}}``
    (see ``retrieval.index_model_record``); an existing index refuses a different record with
    :class:`IndexModelMismatchError`.

    Example:

    ```python
    >>> index = CaptionIndex.create("photos.index", {"fingerprint": "ab12", "generation": {"num_beams": 5}})
    >>> index.add([IndexedPicture("dog.jpg", ("a dog runs on the beach", "a dog on a beach"))])
    >>> [hit.image_id for hit in index.search("dog beach", limit=10)]
    ['dog.jpg']
    ```
    """

    def __init__(self, path: Path, meta: dict[str, Any], engine: Any) -> None:
        self.path = path
        self.meta = meta
        self._engine = engine
        # The searcher of the last commit seen, and that commit's stamp (see _searcher).
        self._searcher_of: tuple[tuple[int, int, int] | None, Any] = (None, None)

    # -- opening -----------------------------------------------------------------------------------

    @staticmethod
    def _schema() -> Any:
        import tantivy

        builder = tantivy.SchemaBuilder()
        # "raw": the whole id is one term, so it can be deleted exactly (paths hold '/', '-', '.').
        builder.add_text_field("image_id", stored=True, tokenizer_name="raw", index_option="basic")
        builder.add_text_field("terms", stored=False, tokenizer_name="whitespace", index_option="freq")
        builder.add_bytes_field("stored", stored=True, indexed=False)  # JSON: captions and source
        return builder.build()

    @classmethod
    def create(
        cls, path: str | os.PathLike, model: Mapping[str, Any], *, exist_ok: bool = False
    ) -> CaptionIndex:
        """
        A new, empty index in the folder ``path`` (created). With ``exist_ok``, an index already there is
        opened instead, provided it was made with the same ``model``.
        """
        path = Path(path).expanduser()
        if (path / META_FILE).exists():
            if exist_ok:
                return cls.open(path, model)
            raise CaptionIndexError(f"{path} already holds a caption index (add to it, or remove the folder)")
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise CaptionIndexError(f"{path} exists and is not an empty folder; choose a new index path")
        import tantivy

        try:
            (path / ENGINE_DIR).mkdir(parents=True, exist_ok=True)
            engine = tantivy.Index(cls._schema(), path=str(path / ENGINE_DIR))
        except (OSError, ValueError) as error:
            raise CaptionIndexError(f"cannot create a caption index at {path}: {one_line(error)}") from None
        meta = {"format": INDEX_FORMAT, "engine": f"tantivy {_engine_version()}", "model": dict(model)}
        # Written last: a folder without index.json is not an index yet, and create() may be run again.
        write_text_atomic(path / META_FILE, json.dumps(meta, indent=2, sort_keys=True))
        return cls(path, meta, engine)

    @classmethod
    def open(cls, path: str | os.PathLike, model: Mapping[str, Any] | None = None) -> CaptionIndex:
        """
        The index in the folder ``path``. Raises :class:`CaptionIndexError` (one line) when there is none
        or it is damaged, and :class:`IndexModelMismatchError` when ``model`` is given and differs from the
        model the index was built with.
        """
        path = Path(path).expanduser()
        meta_path = path / META_FILE
        if not meta_path.is_file():
            raise CaptionIndexError(
                f"no caption index at {path} (build one: scripts/search_images.py build --index {path} ...)"
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
                raise ValueError("not an index description")
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise CaptionIndexError(
                f"caption index {path} is damaged: {META_FILE}: {one_line(error)}"
            ) from None
        if meta.get("format") != INDEX_FORMAT:
            raise CaptionIndexError(
                f"caption index {path} has format {meta.get('format')!r}, this version reads {INDEX_FORMAT!r}: "
                "build it again"
            )
        if model is not None:
            cls._check_model(path, meta["model"], model)
        import tantivy

        try:
            engine = tantivy.Index.open(str(path / ENGINE_DIR))
            engine.reload()
            engine.searcher()  # reads the segment list: a damaged one fails here, not in the first query
        except (OSError, ValueError) as error:
            raise CaptionIndexError(f"caption index {path} is damaged: {one_line(error)}") from None
        return cls(path, meta, engine)

    @staticmethod
    def _check_model(path: Path, stored: Mapping[str, Any], given: Mapping[str, Any]) -> None:
        given = json.loads(json.dumps(dict(given), sort_keys=True))  # as it would be stored
        if given == stored:
            return
        if given.get("fingerprint") != stored.get("fingerprint"):
            raise IndexModelMismatchError(
                f"caption index {path} was built with another model (weights {str(stored.get('fingerprint'))[:12]}, "
                f"not {str(given.get('fingerprint'))[:12]}): use that model, or build a new index"
            )
        old, new = stored.get("generation", {}), given.get("generation", {})
        changed = ", ".join(
            f"{key}={old.get(key)} (not {new.get(key)})"
            for key in sorted({*old, *new})
            if old.get(key) != new.get(key)
        )
        raise IndexModelMismatchError(
            f"caption index {path} was built with other generation settings: {changed or 'another record'}; "
            "use those, or build a new index"
        )

    @property
    def model(self) -> dict[str, Any]:
        """The record of the model and generation settings the captions came from."""
        return self.meta["model"]

    # -- reading -----------------------------------------------------------------------------------

    def _commit_stamp(self) -> tuple[int, int, int] | None:
        """Changes with every commit, by this or another process: the engine replaces its meta.json."""
        try:
            stat = (self.path / ENGINE_DIR / "meta.json").stat()
        except OSError:
            return None
        return (stat.st_ino, stat.st_mtime_ns, stat.st_size)

    def _searcher(self) -> Any:
        """
        A searcher of the last commit. Made again only after a commit (a stat instead of a reload per query:
        reloading and making a searcher were a third of a query's time over a million rows).
        """
        stamp = self._commit_stamp()
        cached_stamp, searcher = self._searcher_of
        if searcher is not None and stamp is not None and stamp == cached_stamp:
            return searcher
        try:
            self._engine.reload()  # sees commits made since, by this or another process
            searcher = self._engine.searcher()
        except ValueError as error:
            raise CaptionIndexError(f"caption index {self.path} is damaged: {one_line(error)}") from None
        self._searcher_of = (stamp, searcher)
        return searcher

    def __len__(self) -> int:
        return int(self._searcher().num_docs)

    def __contains__(self, image_id: object) -> bool:
        return isinstance(image_id, str) and self._searcher().doc_freq("image_id", _id_term(image_id)) > 0

    def search(self, query: str, limit: int = 100) -> list[IndexHit]:
        """
        Up to ``limit`` pictures whose captions share words with ``query``, best first: pictures matching a
        run of three query words before those matching only two, before those matching single words; BM25
        within each group. Any text is accepted; a query without a word that can match gives ``[]``.
        """
        if limit < 1:
            return []
        import tantivy

        terms = query_terms(query)
        if not terms:
            return []
        searcher = self._searcher()
        schema = self._engine.schema
        hits: list[IndexHit] = []
        seen: set[str] = set()
        addresses: set[tuple[int, int]] = set()  # documents already read (a picture is one document)
        try:
            for phrase, phrase_terms in terms.items():
                clauses = [
                    (tantivy.Occur.Should, tantivy.Query.term_query(schema, "terms", term))
                    for term in phrase_terms
                ]
                # Pictures already found through a longer phrase match this query too: ask for that many more.
                # count=False: the engine may skip documents that cannot enter the top (block-max WAND)
                # instead of visiting every match of common words to count them.
                query = tantivy.Query.boolean_query(clauses)
                found = searcher.search(query, limit + len(seen), count=False).hits
                for score, address in found:
                    if (address.segment_ord, address.doc) in addresses:
                        continue
                    addresses.add((address.segment_ord, address.doc))
                    document = searcher.doc(address)
                    stored = json.loads(bytes(document["stored"][0]))
                    image_id = stored.get("image_id", document["image_id"][0])
                    if image_id in seen:
                        continue
                    seen.add(image_id)
                    hits.append(
                        IndexHit(
                            image_id, float(score), phrase, tuple(stored["captions"]), stored.get("source")
                        )
                    )
                    if len(hits) == limit:
                        return hits
        except ValueError as error:  # the engine could not read a segment
            raise CaptionIndexError(f"caption index {self.path} is damaged: {one_line(error)}") from None
        return hits

    def pictures(self) -> Iterator[IndexedPicture]:
        """Every picture in the index (in no particular order)."""
        import tantivy

        searcher = self._searcher()
        total = int(searcher.num_docs)
        if total == 0:
            return
        for _, address in searcher.search(tantivy.Query.all_query(), total).hits:
            document = searcher.doc(address)
            stored = json.loads(bytes(document["stored"][0]))
            image_id = stored.get("image_id", document["image_id"][0])
            yield IndexedPicture(image_id, tuple(stored["captions"]), stored.get("source"))

    # -- writing -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _writer(self) -> Iterator[Any]:
        try:
            writer = self._engine.writer(heap_size=_WRITER_HEAP, num_threads=1)
        except ValueError as error:
            if "lock" in str(error).lower():
                raise CaptionIndexError(
                    f"caption index {self.path} is being written by another process; try again when it is done"
                ) from None
            raise CaptionIndexError(f"caption index {self.path}: {one_line(error)}") from None
        try:
            yield writer
            writer.wait_merging_threads()  # also releases the writer's lock
        except BaseException:
            with contextlib.suppress(ValueError):
                writer.rollback()
            raise

    def add(self, pictures: Iterable[IndexedPicture], *, batch_size: int = DEFAULT_BATCH_SIZE) -> int:
        """
        Adds pictures, replacing any picture already indexed under the same id; one commit per
        ``batch_size`` pictures (streams: the pictures are not all held in memory). A process killed
        meanwhile leaves the index as it was after the last commit. Returns the number added.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        import tantivy

        added = pending = 0
        with self._writer() as writer:
            for picture in pictures:
                if not isinstance(picture.image_id, str) or not picture.image_id:
                    raise ValueError(f"a picture needs a non-empty string id, got {picture.image_id!r}")
                stored = {
                    "image_id": picture.image_id,
                    "captions": list(picture.captions),
                    "source": picture.source,
                }
                term = _id_term(picture.image_id)
                writer.delete_documents_by_term("image_id", term)
                writer.add_document(
                    tantivy.Document(
                        image_id=term,
                        terms=_document_terms(picture.captions),
                        # ASCII JSON: lone surrogates (names that are not UTF-8) are escaped, not lost.
                        stored=json.dumps(stored).encode(),
                    )
                )
                added += 1
                pending += 1
                if pending == batch_size:
                    writer.commit()
                    pending = 0
            if pending:
                writer.commit()
        return added

    def remove(self, image_ids: Iterable[str]) -> int:
        """Removes pictures by id, in one commit; returns how many of them were in the index."""
        ids = list(dict.fromkeys(str(image_id) for image_id in image_ids))
        searcher = self._searcher()
        present = [
            _id_term(image_id) for image_id in ids if searcher.doc_freq("image_id", _id_term(image_id)) > 0
        ]
        if present:
            with self._writer() as writer:
                for term in present:
                    writer.delete_documents_by_term("image_id", term)
                writer.commit()
        return len(present)

    def size_on_disk(self) -> int:
        """Bytes of the index's files."""
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {_describe_model(self.model)})"


def pictures_from_caption_rows(path: str | os.PathLike) -> Iterator[IndexedPicture]:
    """
    The pictures of a ``scripts/caption.py --output`` file (JSON lines with ``path`` or ``image_id``,
    ``caption`` and, with ``--num-return-sequences``, ``captions``), one at a time. Rows of images that
    failed (``error``) and a line cut short by a killed writer are left out. A ``path`` becomes the picture's
    source as an absolute path (a URL stays as it is), so the index finds it again from any folder.
    """
    with open(path, encoding="utf-8") as file:
        for line in file:
            if not line.endswith("\n"):
                break
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if not isinstance(row, dict) or "caption" not in row:
                continue
            captions = row.get("captions") or [row["caption"]]
            if "path" in row:
                key = str(row["path"])
                source = key if key.startswith(("http://", "https://")) else os.path.abspath(key)
            elif "image_id" in row:
                key, source = str(row["image_id"]), None
            else:
                continue
            yield IndexedPicture(key, tuple(str(caption) for caption in captions), source)


def _engine_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tantivy")
    except PackageNotFoundError:  # pragma: no cover - imported from a source tree
        return "unknown"
