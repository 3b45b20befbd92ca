"""Who owns a job, a file or a batch, and who may see it.

Each object records the name of the key that made it (``owner``). A key sees and acts on its
own objects; an admin key on all. Anyone else is answered 404, exactly as for an id that does
not exist, so ids cannot be probed. Without keys configured every request is the one
anonymous owner (an admin), so everything is visible, as before keys existed.

Objects stored before owners were recorded (``owner`` None) are admin-only while keys are
configured: nothing says which client made them, and showing them to every key would give
one client's prompts and files to all the others. The anonymous owner of a keyless server
records None too, so turning keys on later keeps that history with the admin.
"""

from __future__ import annotations

from fastapi import Request

from common.api_keys import ANONYMOUS, Principal
from common.protocol import GenerationJob


def principal_of(request: Request) -> Principal:
    """The request's key (api/auth.py), or the anonymous owner when no keys are configured."""
    return getattr(request.state, "principal", ANONYMOUS)


def owner_of(request: Request) -> str | None:
    """The owner to record on what this request makes."""
    return principal_of(request).name


def can_see(principal: Principal, owner: str | None) -> bool:
    return principal.admin or (owner is not None and owner == principal.name)


def require(request: Request, owner: str | None, not_found: Exception) -> None:
    """Raise ``not_found`` (the same error a missing id gets) unless the request may see an
    object owned by ``owner``."""
    if not can_see(principal_of(request), owner):
        raise not_found


def stamp(request: Request, jobs: list[GenerationJob]) -> None:
    """Mark jobs as the request's: its usage per key is counted from them (the worker adds
    their token counts to the key's totals)."""
    owner = owner_of(request)
    for job in jobs:
        job.owner = owner
