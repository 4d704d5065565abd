"""Tier backends by name, imported lazily so an unused backend's dependencies are never needed."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from kvtier.errors import ConfigError, MissingDependencyError

if TYPE_CHECKING:
    from pydantic import BaseModel

    from kvtier.tiers.base import Tier

#: name -> ("module:Class", the pip requirement that provides its optional dependencies)
TIER_BACKENDS: dict[str, tuple[str, str]] = {
    "host": ("kvtier.tiers.host:HostTier", "kvtier"),
    "disk": ("kvtier.tiers.disk:DiskTier", "kvtier"),
    "s3": ("kvtier.tiers.s3:S3Tier", "boto3"),
}


def tier_class(kind: str) -> type[Tier]:
    """Return the backend class registered as ``kind``."""
    try:
        target, requirement = TIER_BACKENDS[kind]
    except KeyError:
        raise ConfigError(f"unknown tier {kind!r}; available tiers: {', '.join(sorted(TIER_BACKENDS))}") from None
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise MissingDependencyError(
            f"tier {kind!r} needs the package {exc.name!r}: install it with `pip install {requirement}`"
        ) from exc
    return getattr(module, class_name)


def create_tier(kind: str, settings: BaseModel, name: str | None = None) -> Tier:
    """Build the ``kind`` backend from its typed settings section."""
    return tier_class(kind)(settings, name=name or kind)  # type: ignore[call-arg]
