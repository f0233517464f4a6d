"""Check at ``setup`` that a module has what a callback needs (the protocols of :mod:`ko_lightning.protocols`)."""

from __future__ import annotations

__all__ = ["protocol_members", "require_protocol"]


def protocol_members(protocol: type) -> list[str]:
    """The public members a :class:`typing.Protocol` declares: its methods, properties and annotated attributes."""
    declared = set(getattr(protocol, "__annotations__", {})) | {n for n in vars(protocol) if not n.startswith("_")}
    return sorted(declared)


def require_protocol(module: object, protocol: type, owner: str) -> None:
    """Fail early, naming what is missing, when ``module`` lacks a member of ``protocol``.

    Args:
        module: the LightningModule a callback is attached to.
        protocol: the protocol that lists what the callback uses (e.g. ``ko_lightning.protocols.PathModule``).
        owner: the callback's name, for the message.

    Raises:
        TypeError: naming the module's class, the protocol and each missing member.
    """
    missing = [name for name in protocol_members(protocol) if not hasattr(module, name)]
    if missing:
        raise TypeError(
            f"{owner} needs a module with the members of ko_lightning.protocols.{protocol.__name__} "
            f"({', '.join(protocol_members(protocol))}); {type(module).__name__} lacks {', '.join(missing)}"
        )
