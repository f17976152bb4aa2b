"""Image backbones with one input contract: raw pixels ``[batch, H, W, C]`` float32 in [0, 255].

Every backbone built here contains its own preprocessing (rescaling, mean/std, channel
order, grayscale -> RGB), so a caller never needs to know which family it is feeding:

    backbone = build_backbone("small_cnn", (28, 28, 1))           # [B, 28, 28, 1] -> [B, 7, 7, 128]
    backbone = build_backbone("resnet50", (64, 64, 3))             # [B, 64, 64, 3] -> [B, 2, 2, 2048]
    backbone = build_backbone("mobilenetv3-small", (96, 96, 1),    # grayscale is repeated to RGB
                              weights="/data/mnv3_small_notop.h5")

The output is the backbone's last feature map ``[batch, h, w, channels]`` (no pooling);
`atl_keras.model.ATLModel` adds pooling, projection and L2 normalisation.

Weights: ``None`` (random init), ``"imagenet"`` (from Keras' local cache; downloaded into it
only with ``allow_download=True`` or `download_imagenet_weights`), or a path to a local
weights file (``.h5`` / ``.weights.h5``). Nothing downloads unless asked to.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import keras
from keras import layers, ops

__all__ = [
    "PixelPreprocessing",
    "available_backbones",
    "build_backbone",
    "download_imagenet_weights",
    "find_cached_imagenet_weights",
    "imagenet_weights_filename",
    "small_cnn",
]

# Per-channel constants used by keras.applications.imagenet_utils.preprocess_input.
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
PREPROCESSING_MODES = ("unit", "caffe", "torch", "tf", "none")


@keras.saving.register_keras_serializable(package="atl_keras")
class PixelPreprocessing(layers.Layer):
    """Maps pixels in [0, 255] to what a backbone family expects. ``[..., C] -> [..., C]``.

    Modes (the same arithmetic as ``keras.applications.imagenet_utils.preprocess_input``):
      - ``"unit"``: ``x / 255`` -> [0, 1].
      - ``"tf"``: ``x / 127.5 - 1`` -> [-1, 1] (MobileNetV2, ResNetV2, Inception, Xception).
      - ``"torch"``: ``(x / 255 - mean) / std`` per RGB channel (DenseNet).
      - ``"caffe"``: RGB -> BGR, then minus the ImageNet BGR mean (ResNet50, VGG).
      - ``"none"``: identity (EfficientNet(V2), MobileNetV3, ConvNeXt preprocess inside).
    """

    def __init__(self, mode: str = "unit", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if mode not in PREPROCESSING_MODES:
            raise ValueError(
                f"Unknown preprocessing mode {mode!r}; expected one of {PREPROCESSING_MODES}."
            )
        self.mode = mode

    def call(self, x):
        x = ops.cast(x, self.compute_dtype)
        if self.mode == "unit":
            return x / 255.0
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            mean = ops.convert_to_tensor(_TORCH_MEAN, dtype=self.compute_dtype)
            std = ops.convert_to_tensor(_TORCH_STD, dtype=self.compute_dtype)
            return (x / 255.0 - mean) / std
        if self.mode == "caffe":
            mean = ops.convert_to_tensor(_CAFFE_BGR_MEAN, dtype=self.compute_dtype)
            return ops.flip(x, axis=-1) - mean
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mode": self.mode}


@dataclass(frozen=True)
class _Application:
    """How to build one ``keras.applications`` model and find its ImageNet weights offline."""

    constructor: Callable[..., keras.Model]
    preprocessing: str
    notop_filename: Callable[[tuple[int, int, int]], str]
    min_size: int = 32
    kwargs: dict[str, Any] = field(default_factory=dict)


def _fixed(filename: str) -> Callable[[tuple[int, int, int]], str]:
    return lambda input_shape: filename


def _mobilenet_v2_filename(input_shape: tuple[int, int, int]) -> str:
    # keras.applications.MobileNetV2 picks the 224 weights unless the input is a square
    # of one of the sizes it ships (see keras/src/applications/mobilenet_v2.py).
    rows, cols = input_shape[0], input_shape[1]
    size = rows if rows == cols and rows in (96, 128, 160, 192, 224) else 224
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{size}_no_top.h5"


def _applications() -> dict[str, _Application]:
    apps = keras.applications
    table = {
        "resnet50": _Application(
            apps.ResNet50, "caffe",
            _fixed("resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
        ),
        "resnet101": _Application(
            apps.ResNet101, "caffe",
            _fixed("resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5"),
        ),
        "resnet50v2": _Application(
            apps.ResNet50V2, "tf",
            _fixed("resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5"),
        ),
        "mobilenetv2": _Application(apps.MobileNetV2, "tf", _mobilenet_v2_filename),
        "mobilenetv3-small": _Application(
            apps.MobileNetV3Small, "none",
            _fixed("weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"),
            kwargs={"include_preprocessing": True},
        ),
        "mobilenetv3-large": _Application(
            apps.MobileNetV3Large, "none",
            _fixed("weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5"),
            kwargs={"include_preprocessing": True},
        ),
    }
    for variant, ctor in (
        ("b0", apps.EfficientNetV2B0),
        ("b1", apps.EfficientNetV2B1),
        ("b2", apps.EfficientNetV2B2),
        ("b3", apps.EfficientNetV2B3),
        ("s", apps.EfficientNetV2S),
        ("m", apps.EfficientNetV2M),
        ("l", apps.EfficientNetV2L),
    ):
        table[f"efficientnetv2-{variant}"] = _Application(
            ctor, "none", _fixed(f"efficientnetv2-{variant}_notop.h5"),
            kwargs={"include_preprocessing": True},
        )
    return table


_APPLICATIONS = _applications()
SMALL_CNN = "small_cnn"


def available_backbones() -> tuple[str, ...]:
    """Names accepted by `build_backbone`, e.g. ``("small_cnn", "resnet50", ...)``."""
    return (SMALL_CNN, *sorted(_APPLICATIONS))


def imagenet_weights_filename(name: str, input_shape: Sequence[int]) -> str:
    """File name Keras caches the no-top ImageNet weights of backbone ``name`` under.

    Looked up in ``<keras home>/models/`` (``~/.keras/models`` or ``$KERAS_HOME/models``).
    """
    app = _get_application(name)
    return app.notop_filename(_rgb_shape(input_shape))


def _keras_cache_dirs() -> list[str]:
    """Directories where ``keras.utils.get_file(..., cache_subdir="models")`` stores files."""
    dirs = []
    try:  # Keras' own resolution of KERAS_HOME / ~/.keras (private helper, stable since 3.0).
        from keras.src.backend.config import keras_home

        dirs.append(os.path.join(os.path.expanduser(keras_home()), "models"))
    except ImportError:  # pragma: no cover - only on a Keras without that helper
        pass
    dirs.append(os.path.join(os.path.expanduser("~"), ".keras", "models"))
    dirs.append(os.path.join("/tmp", ".keras", "models"))  # get_file's fallback when ~ is read-only
    return list(dict.fromkeys(dirs))


def find_cached_imagenet_weights(name: str, input_shape: Sequence[int]) -> str | None:
    """Path of the cached no-top ImageNet weights for ``name``, or ``None`` if not cached."""
    filename = imagenet_weights_filename(name, input_shape)
    for directory in _keras_cache_dirs():
        path = os.path.join(directory, filename)
        if os.path.isfile(path):
            return path
    return None


def _get_application(name: str) -> _Application:
    if name not in _APPLICATIONS:
        raise ValueError(
            f"Unknown backbone {name!r}. Available backbones: {', '.join(available_backbones())}."
        )
    return _APPLICATIONS[name]


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 3 or any(not isinstance(d, int) or d <= 0 for d in shape):
        raise ValueError(
            f"input_shape must be (height, width, channels) with positive ints, got {input_shape!r} "
            "(channels_last; no batch dimension)."
        )
    if shape[2] not in (1, 3):
        raise ValueError(
            f"input_shape has {shape[2]} channels; backbones take grayscale (1) or RGB (3) images."
        )
    return shape  # type: ignore[return-value]


def _rgb_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    height, width, _ = _check_input_shape(input_shape)
    return (height, width, 3)


def _check_weights_path(weights: str) -> str:
    path = os.path.expanduser(str(weights))
    if not (path.endswith(".h5") or path.endswith(".keras")):
        raise ValueError(
            f"weights={weights!r} is neither None, 'imagenet' nor a weights file path: a local "
            "weights file must end in '.weights.h5' (Keras 3 `save_weights`) or '.h5' (legacy/"
            "keras.applications format)."
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Backbone weights file {path!r} does not exist. Pass an existing '.weights.h5' / '.h5' "
            "file, or weights=None to start from random initialisation."
        )
    return path


def small_cnn(
    input_shape: Sequence[int] = (28, 28, 1),
    filters: Sequence[int] = (32, 64, 128),
    name: str = "small_cnn",
) -> keras.Model:
    """Compact CNN for small images: rescale 1/255, then per block conv3x3-BN-ReLU(-maxpool 2).

    All blocks but the last end with a 2x2 max-pool (``padding="same"``), so a
    ``[B, 28, 28, 1]`` input gives a ``[B, 7, 7, filters[-1]]`` feature map.
    """
    shape = _check_input_shape(input_shape)
    inputs = keras.Input(shape=shape, name="pixels")
    x = PixelPreprocessing("unit", name="rescale")(inputs)
    for i, width in enumerate(filters):
        x = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"block{i + 1}_conv")(x)
        x = layers.BatchNormalization(name=f"block{i + 1}_bn")(x)
        x = layers.ReLU(name=f"block{i + 1}_relu")(x)
        if i < len(filters) - 1:
            x = layers.MaxPooling2D(2, padding="same", name=f"block{i + 1}_pool")(x)
    return keras.Model(inputs, x, name=name)


def download_imagenet_weights(name: str, input_shape: Sequence[int]) -> str:
    """Path of the no-top ImageNet weights of ``name`` in Keras' cache, downloading them
    with Keras' normal mechanism (``keras.utils.get_file``) when they are not there yet.

    Raises:
        ValueError: unknown name (or ``"small_cnn"``, which has no ImageNet weights).
        ConnectionError: the weights are not cached and the download failed (offline?).
    """
    if name == SMALL_CNN:
        raise ValueError("There are no ImageNet weights for 'small_cnn'.")
    cached = find_cached_imagenet_weights(name, input_shape)
    if cached is not None:
        return cached
    app = _get_application(name)
    try:
        app.constructor(include_top=False, weights="imagenet", input_shape=_rgb_shape(input_shape),
                        **app.kwargs)
    except Exception as err:  # get_file raises a bare Exception on URL/HTTP errors
        raise ConnectionError(
            f"Could not download the ImageNet weights of {name!r} "
            f"({imagenet_weights_filename(name, input_shape)!r}): {err}. Without network access, "
            f"copy that file into {_keras_cache_dirs()[0]} or pass its path as weights."
        ) from err
    cached = find_cached_imagenet_weights(name, input_shape)
    if cached is None:  # pragma: no cover - Keras stored it under a name we do not know
        raise FileNotFoundError(
            f"Keras downloaded the ImageNet weights of {name!r} but they are not at "
            f"{imagenet_weights_filename(name, input_shape)!r} in {', '.join(_keras_cache_dirs())}."
        )
    return cached


def build_backbone(
    name: str,
    input_shape: Sequence[int],
    weights: str | os.PathLike | None = None,
    allow_download: bool = False,
) -> keras.Model:
    """Build backbone ``name``: ``[B, H, W, C]`` float32 pixels in [0, 255] -> ``[B, h, w, F]``.

    Args:
        name: ``"small_cnn"`` or a keras.applications name (see `available_backbones`).
        input_shape: ``(H, W, C)`` with C = 1 (repeated to RGB for applications) or 3.
        weights: ``None`` (random), ``"imagenet"`` (from Keras' local cache), or a path to a
            local ``.weights.h5`` file saved from a backbone built here
            (``backbone.save_weights``) or, for applications, a keras.applications-format
            no-top ``.h5`` file.
        allow_download: with ``weights="imagenet"`` not in the cache, let Keras download
            them (its normal behaviour); by default fail fast instead.

    Raises:
        ValueError: unknown name, bad input shape (e.g. smaller than 32x32 for applications),
            bad ``weights`` value.
        FileNotFoundError: ImageNet weights not cached (and ``allow_download`` is False), or
            the weights file does not exist.
        ConnectionError: ``allow_download`` and the download failed.
    """
    shape = _check_input_shape(input_shape)
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise ValueError(f"weights must be None, 'imagenet' or a file path, got {weights!r}.")
    weights = os.fspath(weights) if weights is not None else None

    if name == SMALL_CNN:
        if weights == "imagenet":
            raise ValueError(
                "There are no ImageNet weights for 'small_cnn'. Use weights=None or a "
                "local '.weights.h5' file."
            )
        path = _check_weights_path(weights) if weights is not None else None
        model = small_cnn(shape)
        if path is not None:
            _load_weights(model, path)
        return model

    app = _get_application(name)
    height, width, channels = shape
    if height < app.min_size or width < app.min_size:
        raise ValueError(
            f"Backbone {name!r} needs images of at least {app.min_size}x{app.min_size} pixels, got "
            f"{height}x{width}. Resize the images (e.g. keras.layers.Resizing) or use "
            "backbone='small_cnn' for small images."
        )

    app_weights: str | None = None
    wrapper_weights: str | None = None
    if weights == "imagenet":
        app_weights = find_cached_imagenet_weights(name, shape)
        if app_weights is None and allow_download:
            app_weights = download_imagenet_weights(name, shape)
        elif app_weights is None:
            filename = imagenet_weights_filename(name, shape)
            raise FileNotFoundError(
                f"ImageNet weights for {name!r} are not available offline: {filename!r} is not in "
                f"Keras' cache ({', '.join(_keras_cache_dirs())}), and downloads are off by default. "
                "To let Keras download them, pass allow_download=True (`atl train --allow-download` "
                f"or ATL_ALLOW_DOWNLOAD=1); or copy that file into {_keras_cache_dirs()[0]}, or pass "
                f"weights='/path/to/{filename}' (or any '.weights.h5' saved from this backbone), or "
                "use weights=None to train from scratch."
            )
    elif weights is not None:
        path = _check_weights_path(weights)
        if path.endswith(".weights.h5") or path.endswith(".keras"):
            wrapper_weights = path
        else:
            app_weights = path  # keras.applications (legacy h5) format, loaded by the application.

    inputs = keras.Input(shape=shape, name="pixels")
    x = inputs
    if channels == 1:
        x = layers.Concatenate(axis=-1, name="gray_to_rgb")([x, x, x])
    x = PixelPreprocessing(app.preprocessing, name="preprocess")(x)
    try:
        application = app.constructor(
            include_top=False,
            weights=app_weights,
            input_shape=(height, width, 3),
            **app.kwargs,
        )
    except ValueError as err:
        if app_weights is not None:
            raise ValueError(
                f"Could not load weights {app_weights!r} into {name!r}: {err}. The file must hold "
                f"no-top weights of {name!r} (include_top=False)."
            ) from err
        raise
    x = application(x)
    model = keras.Model(inputs, x, name=f"{name.replace('-', '_')}_backbone")
    if wrapper_weights is not None:
        _load_weights(model, wrapper_weights)
    return model


def _load_weights(model: keras.Model, path: str) -> None:
    try:
        model.load_weights(path)
    except (ValueError, KeyError) as err:
        raise ValueError(
            f"Weights file {path!r} does not match backbone {model.name!r}: {err}. Save it with "
            "`build_backbone(same name, same input_shape).save_weights(path)` (or "
            "`ATLModel.backbone.save_weights`)."
        ) from err
