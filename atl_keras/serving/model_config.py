"""What to serve: TF Serving's ``models.config``, version policies and version directories.

Pure functions and small frozen dataclasses; no TensorFlow import, no threads.

- :func:`parse_model_config` / :func:`load_model_config_file`: TF Serving's text-format
  ``ModelServerConfig`` -> ``list[ServedModel]``.
- :func:`single_model`: the ``--model_name`` / ``--model_base_path`` shortcut.
- :class:`VersionPolicy`: ``latest {num_versions}``, ``all {}``, ``specific {versions}``.
- :func:`list_version_dirs`: integer-named, complete SavedModel directories of a base path.
- :func:`parse_ssl_config`, :func:`parse_channel_arguments`: the matching server flags.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Iterable, Mapping, Sequence

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from tensorflow_serving.config import model_server_config_pb2

SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")


@dataclasses.dataclass(frozen=True)
class VersionPolicy:
    """Which of the versions on disk to serve (TF Serving's ``ServableVersionPolicy``).

    ``kind="latest"`` serves the ``num_versions`` highest versions, ``"all"`` every
    version, ``"specific"`` exactly ``versions`` (those present on disk).
    """

    kind: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("latest", "all", "specific"):
            raise ValueError(
                f"version policy kind must be 'latest', 'all' or 'specific', got {self.kind!r}"
            )
        if self.kind == "latest" and self.num_versions < 1:
            raise ValueError(f"latest {{ num_versions }} must be >= 1, got {self.num_versions}")
        if self.kind == "specific" and not self.versions:
            raise ValueError("specific {} needs at least one 'versions: N' entry")

    def select(self, available: Iterable[int]) -> list[int]:
        """The versions to serve among ``available``, highest first."""
        versions = sorted(set(available), reverse=True)
        if self.kind == "latest":
            return versions[: self.num_versions]
        if self.kind == "all":
            return versions
        wanted = set(self.versions)
        return [v for v in versions if v in wanted]


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """One model: a name, a base path holding ``<version>/`` SavedModel dirs, a policy."""

    name: str
    base_path: str
    version_policy: VersionPolicy = VersionPolicy()
    version_labels: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a served model needs a non-empty name")
        if not self.base_path:
            raise ValueError(f"model {self.name!r} needs a base_path (the dir holding <version>/ dirs)")


def single_model(name: str, base_path: str | os.PathLike) -> ServedModel:
    """The ``--model_name NAME --model_base_path PATH`` configuration."""
    return ServedModel(name=name, base_path=str(pathlib.Path(base_path).absolute()))


def _policy_from_proto(config: model_server_config_pb2.ModelConfig) -> VersionPolicy:
    if not config.HasField("model_version_policy"):
        return VersionPolicy()
    policy = config.model_version_policy
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        return VersionPolicy("all")
    if which == "specific":
        return VersionPolicy("specific", versions=tuple(int(v) for v in policy.specific.versions))
    num = policy.latest.num_versions if which == "latest" else 1
    return VersionPolicy("latest", num_versions=num or 1)


def served_models_from_proto(
    config: model_server_config_pb2.ModelServerConfig, *, relative_to: str | os.PathLike | None = None
) -> list[ServedModel]:
    """``ModelServerConfig`` proto -> ``list[ServedModel]``, validated.

    Relative ``base_path`` entries are resolved against ``relative_to`` (default: the
    current directory, as ``tensorflow_model_server`` does).
    """
    if config.HasField("custom_model_config"):
        raise ValueError("custom_model_config is not supported; use model_config_list")
    root = pathlib.Path(relative_to) if relative_to is not None else pathlib.Path.cwd()
    models: list[ServedModel] = []
    seen: set[str] = set()
    for entry in config.model_config_list.config:
        if not entry.name:
            raise ValueError("every config { } in models.config needs a name: '...'")
        if entry.name in seen:
            raise ValueError(f"model name {entry.name!r} appears twice in models.config")
        seen.add(entry.name)
        if entry.model_platform not in ("", "tensorflow"):
            raise ValueError(
                f"model {entry.name!r}: model_platform {entry.model_platform!r} is not supported; "
                "only 'tensorflow' SavedModels are served"
            )
        base = pathlib.Path(entry.base_path)
        if entry.base_path and not base.is_absolute():
            base = root / base
        models.append(
            ServedModel(
                name=entry.name,
                base_path=str(base) if entry.base_path else "",
                version_policy=_policy_from_proto(entry),
                version_labels={str(k): int(v) for k, v in entry.version_labels.items()},
            )
        )
    if not models:
        raise ValueError("models.config has no model_config_list { config { ... } } entries")
    return models


def parse_model_config(
    text: str, *, relative_to: str | os.PathLike | None = None
) -> list[ServedModel]:
    """Parse TF Serving's text-format ``ModelServerConfig`` (the ``models.config`` file)."""
    proto = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, proto)
    except text_format.ParseError as err:
        raise ValueError(f"invalid models.config (ModelServerConfig text format): {err}") from err
    return served_models_from_proto(proto, relative_to=relative_to)


def load_model_config_file(path: str | os.PathLike) -> list[ServedModel]:
    """Read and parse a ``models.config`` file; relative base paths resolve against the cwd."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--model_config_file {path} does not exist")
    return parse_model_config(path.read_text())


def to_model_server_config(models: Sequence[ServedModel]) -> model_server_config_pb2.ModelServerConfig:
    """``list[ServedModel]`` -> ``ModelServerConfig`` proto (write it with ``text_format``)."""
    proto = model_server_config_pb2.ModelServerConfig()
    for model in models:
        entry = proto.model_config_list.config.add()
        entry.name = model.name
        entry.base_path = model.base_path
        entry.model_platform = "tensorflow"
        policy = model.version_policy
        if policy.kind == "all":
            entry.model_version_policy.all.SetInParent()
        elif policy.kind == "specific":
            entry.model_version_policy.specific.versions.extend(policy.versions)
        else:
            entry.model_version_policy.latest.num_versions = policy.num_versions
        for label, version in model.version_labels.items():
            entry.version_labels[label] = version
    return proto


def is_saved_model_dir(path: pathlib.Path) -> bool:
    """True if ``path`` holds a SavedModel (``saved_model.pb`` or ``.pbtxt``)."""
    return any((path / f).is_file() for f in SAVED_MODEL_FILES)


def list_version_dirs(base_path: str | os.PathLike) -> dict[int, pathlib.Path]:
    """``{version: dir}`` for every integer-named SavedModel directory under ``base_path``.

    Non-integer names (``.tmp-3-xyz``, ``README.md``) and integer directories without a
    ``saved_model.pb`` yet are skipped. A missing base path gives ``{}``.
    """
    base = pathlib.Path(base_path)
    try:
        entries = list(base.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return {}
    found: dict[int, pathlib.Path] = {}
    for entry in entries:
        if entry.name.isdigit() and entry.is_dir() and is_saved_model_dir(entry):
            found[int(entry.name)] = entry
    return found


def dir_fingerprint(path: pathlib.Path) -> tuple:
    """Cheap change detector for a version dir: (relative path, size, mtime) of every file."""
    items = []
    for root, _, files in os.walk(path):
        for f in files:
            p = pathlib.Path(root) / f
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            items.append((str(p.relative_to(path)), st.st_size, st.st_mtime_ns))
    return tuple(sorted(items))


def version_identity(path: pathlib.Path) -> tuple:
    """Cheaper than :func:`dir_fingerprint`: changes when a version directory is replaced.

    ``atl export --force`` renames a new directory over the old one, so the directory's
    inode and its ``saved_model.pb`` (inode, size, mtime) change. Missing files give ``()``.
    """
    try:
        st = path.stat()
        identity: tuple = (st.st_dev, st.st_ino)
        for name in SAVED_MODEL_FILES:
            pb = path / name
            if pb.exists():
                s = pb.stat()
                identity += (name, s.st_ino, s.st_size, s.st_mtime_ns)
        return identity
    except FileNotFoundError:
        return ()


# --- TLS: TF Serving's --ssl_config_file holds a text-format tensorflow.serving.SSLConfig.
# Its proto (tensorflow_serving/config/ssl_config.proto) is not shipped in the pip wheel,
# so the same four-field message is declared here and parsed with text_format.


@dataclasses.dataclass(frozen=True)
class TLSConfig:
    """PEM contents (not paths): server key and certificate, optional client CA."""

    server_key: bytes
    server_cert: bytes
    custom_ca: bytes | None = None
    client_verify: bool = False

    def __post_init__(self) -> None:
        if self.client_verify and not self.custom_ca:
            raise ValueError(
                "client_verify: true needs custom_ca (the CA PEM that signs client certificates); "
                "add custom_ca to --ssl_config_file or set client_verify: false"
            )
        check_key_pair(self.server_key, self.server_cert)


def check_key_pair(key_pem: bytes, cert_pem: bytes) -> None:
    """Raise `ValueError` unless ``key_pem`` is the private key of the PEM certificate ``cert_pem``
    (gRPC would only fail later, at bind time, with an error that reads like a busy port)."""
    import ssl
    import tempfile

    with tempfile.TemporaryDirectory(prefix="atl-tls-check-") as tmp:
        key_path, cert_path = os.path.join(tmp, "key.pem"), os.path.join(tmp, "cert.pem")
        for path, data in ((key_path, key_pem), (cert_path, cert_pem)):
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
                f.write(data)
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_path, key_path)
        except ssl.SSLError as err:
            if "KEY_VALUES_MISMATCH" in str(err):
                raise ValueError(
                    "the TLS private key does not match the certificate (--ssl_key / server_key must be "
                    "the key the --ssl_cert / server_cert was issued for)"
                ) from None
            raise ValueError(
                f"the TLS certificate or private key is not a valid PEM file ({err.reason or err}); "
                "pass PEM files (-----BEGIN CERTIFICATE----- / -----BEGIN PRIVATE KEY-----)"
            ) from None


def _ssl_config_class():
    fdp = descriptor_pb2.FileDescriptorProto(
        name="atl_serving/ssl_config.proto", package="tensorflow.serving", syntax="proto3"
    )
    msg = fdp.message_type.add(name="SSLConfig")
    string, boolean = descriptor_pb2.FieldDescriptorProto.TYPE_STRING, descriptor_pb2.FieldDescriptorProto.TYPE_BOOL
    optional = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
    for number, (name, ftype) in enumerate(
        [("server_key", string), ("server_cert", string), ("custom_ca", string), ("client_verify", boolean)],
        start=1,
    ):
        msg.field.add(name=name, number=number, type=ftype, label=optional)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.serving.SSLConfig"))


def parse_ssl_config(text: str) -> TLSConfig:
    """Parse TF Serving's ``--ssl_config_file`` (text-format ``SSLConfig``)."""
    proto = _ssl_config_class()()
    try:
        text_format.Parse(text, proto)
    except text_format.ParseError as err:
        raise ValueError(f"invalid --ssl_config_file (SSLConfig text format): {err}") from err
    if not proto.server_key or not proto.server_cert:
        raise ValueError("--ssl_config_file needs both server_key and server_cert (PEM contents)")
    return TLSConfig(
        server_key=proto.server_key.encode(),
        server_cert=proto.server_cert.encode(),
        custom_ca=proto.custom_ca.encode() or None,
        client_verify=proto.client_verify,
    )


def parse_channel_arguments(text: str) -> list[tuple[str, int | str]]:
    """``"grpc.max_connection_age_ms=60000,grpc.x=y"`` -> ``[(key, int or str), ...]``."""
    args: list[tuple[str, int | str]] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--grpc_channel_arguments entry {item!r} is not key=value")
        try:
            args.append((key, int(value)))
        except ValueError:
            args.append((key, value))
    return args
