"""Edits to the model registry, which is the YAML config file itself.

Every edit is validated as a whole config before anything is written, then written
atomically (temporary file in the same directory, fsync, rename), so a crash or bad input
never leaves a half-written file.  ruamel.yaml's round-trip mode keeps the comments and
layout people put in their config.  :meth:`RegistryFile.edit` holds a file lock
(``filelock``, next to the file) from the read to the write, so two processes editing at
once each see the other's edit; a symlinked config is edited where the link points; a
read-only file, or one in a directory that cannot be written, is refused in one line.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import filelock
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from ..config import ManagerConfig, require_units
from ..errors import ConfigError, UnknownModel
from ..spec import format_duration


def _yaml() -> YAML:
    yaml = YAML()  # round-trip: comments, order and quoting survive
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


LOCK_TIMEOUT = 30.0


class RegistryFile:
    """Load, edit and atomically save the registry part of a config file.  Use
    :meth:`edit` for a read-modify-write that other processes cannot interleave with."""

    @classmethod
    @contextlib.contextmanager
    def edit(
        cls,
        path: str | os.PathLike[str],
        *,
        environ: Mapping[str, str] | None = None,
        timeout: float = LOCK_TIMEOUT,
    ) -> Iterator[RegistryFile]:
        """The registry at ``path``, read under a lock held until the block ends (call
        :meth:`save` inside it)."""
        target = writable_target(Path(path))
        lock = filelock.FileLock(target.with_name(f".{target.name}.lock"), timeout=timeout)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise ConfigError(
                f"{path}: another process has been editing it for {format_duration(timeout)}; try again"
            ) from None
        except OSError as exc:
            raise ConfigError(
                f"{path}: cannot lock it for editing in {target.parent} ({exc.strerror})"
            ) from None
        try:
            yield cls(path, environ=environ)
        finally:
            lock.release()

    def __init__(self, path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None):
        """``environ``: the ``MODELMORA_*`` overrides every command will apply on top of the
        file; an edit that would break the config under them is refused too."""
        self.path = Path(path)
        self.environ = environ
        if self.path.exists():
            try:
                data = _yaml().load(self.path.read_text(encoding="utf-8"))
            except Exception as exc:
                raise ConfigError(f"{self.path}: cannot parse YAML ({exc})".replace("\n", " ")) from None
        else:
            data = None
        self.data: CommentedMap = data if data is not None else CommentedMap()
        if not isinstance(self.data, dict):
            raise ConfigError(f"{self.path}: expected a mapping at the top level")
        self._fine_with_environment = self._environment_problem() is None

    @property
    def models(self) -> CommentedMap:
        models = self.data.get("models")
        if not isinstance(models, CommentedMap):
            if models:
                raise ConfigError(f"{self.path}: models: expected a mapping of name → model")
            models = CommentedMap()
            self.data["models"] = models
        return models

    def validate(self) -> ManagerConfig:
        data = _plain(self.data)
        require_units(data, source=str(self.path))  # as when the file is read
        return ManagerConfig.from_dict(data, source=str(self.path))

    def _environment_problem(self) -> str | None:
        if self.environ is None:
            return None
        try:
            ManagerConfig.from_dict(_plain(self.data), source=str(self.path), environ=self.environ)
        except ConfigError as exc:
            return str(exc)
        return None

    def add(self, name: str, fields: dict[str, Any], *, replace: bool = False) -> None:
        if name in self.models and not replace:
            raise ConfigError(f"{self.path}: model {name!r} already exists (use --replace to overwrite it)")
        entry = CommentedMap()
        for key, value in fields.items():
            if value is not None:
                entry[key] = value
        self.models[name] = entry

    def remove(self, name: str, *, new_default: str | None = None) -> None:
        if name not in self.models:
            raise UnknownModel(name, list(self.models))
        from_env = (self.environ or {}).get("MODELMORA_DEFAULT_MODEL")
        if from_env == name:
            raise ConfigError(
                f"{self.path}: {name!r} is the default model through MODELMORA_DEFAULT_MODEL in the "
                "environment; change or unset that first"
            )
        if self.data.get("default_model") == name:
            if new_default is None:
                raise ConfigError(
                    f"{self.path}: {name!r} is the default model; name a new one with --new-default NAME"
                )
            if new_default == name:
                raise ConfigError(f"{self.path}: the new default cannot be the model being removed")
        del self.models[name]
        if new_default is not None:
            self.set_default(new_default)

    def set_default(self, name: str) -> None:
        if name not in self.models:
            raise UnknownModel(name, list(self.models))
        self.data["default_model"] = name

    def save(self) -> ManagerConfig:
        """Validate the edited config, then replace the file atomically."""
        from ..providers import check_providers

        config = self.validate()
        writable_target(self.path)
        try:
            check_providers(config)
        except ConfigError as exc:
            raise ConfigError(f"{self.path}: {exc}") from None
        problem = self._environment_problem()
        if problem is not None and self._fine_with_environment:
            raise ConfigError(f"{problem} (after this edit of {self.path}; nothing was written)")
        buffer = io.StringIO()
        _yaml().dump(self.data, buffer)
        try:
            atomic_write(self.path.resolve(), buffer.getvalue())  # a symlink stays a symlink
        except OSError as exc:
            where = self.path.resolve().parent
            raise ConfigError(
                f"{self.path}: cannot write it in {where} ({exc.strerror or exc}); nothing was changed"
            ) from None
        return config


def writable_target(path: Path) -> Path:
    """The file an edit of ``path`` writes (a symlink's target), refusing one whose mode
    says read-only: root could write it anyway, but someone made it read-only on purpose."""
    target = path.resolve()
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        return target
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror})") from None
    if not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"{path}: the file is read-only (mode {stat.S_IMODE(mode):04o}); not changing it")
    return target


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _plain(value: Any) -> Any:
    """ruamel's commented containers → plain dicts/lists for pydantic."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


__all__ = ["RegistryFile", "atomic_write", "writable_target"]
