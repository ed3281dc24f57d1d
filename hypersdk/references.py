"""Files an image names: backing files, VMDK extents, OVF disk hrefs, a VM directory's disks.

Images come from people we do not trust, so a name inside one is never followed blindly (qemu-img
does: it is a tool for trusted images). A referenced file must, after every symlink is resolved,
lie inside the referring image's own directory; the one exception is a chain this tool wrote
into a repository: an export directory (it holds a ``manifest.json``) may name a file of a
sibling export directory (which holds one too), as a delta names its base. Anything else needs
an explicit opt-in (``hyperctl --allow-backing-outside``, ``ReferencePolicy(allow_outside=True)``).

Whatever the policy, a referenced file must be a regular file (a FIFO would hang the reader, a
device is not an image), and an image that is not itself a local file (a member of an OVA, an
object on a target) may not name any file at all: its names would resolve against a directory
that is not its own.

The policy rides in a context variable set by ``hypersdk.formats.open_image`` for the duration
of one open, so drivers that open related files need no extra parameter.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from hypersdk.errors import FormatError

MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class ReferencePolicy:
    """How far an image's references may reach.

    allow_outside: follow references anywhere (the user vouches for the images).
    roots: extra directories whose files any image may name (a chain the user passed explicitly).
    repository_chains: an export directory's image may name a sibling export's file (off for
        images that are not exports, e.g. a local VM's disks: a planted manifest.json there
        must not open a way out).
    """

    allow_outside: bool = False
    roots: tuple[str, ...] = ()
    repository_chains: bool = True


DEFAULT_POLICY = ReferencePolicy()
_POLICY: contextvars.ContextVar[ReferencePolicy | None] = contextvars.ContextVar(
    "reference_policy", default=None
)


def current_policy() -> ReferencePolicy:
    return _POLICY.get() or DEFAULT_POLICY


@contextlib.contextmanager
def reference_policy(policy: ReferencePolicy | None) -> Iterator[ReferencePolicy]:
    """Make ``policy`` the one in force (None keeps the current one)."""
    if policy is None:
        yield current_policy()
        return
    token = _POLICY.set(policy)
    try:
        yield policy
    finally:
        _POLICY.reset(token)


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _is_export_dir(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, MANIFEST_NAME))


def printable(text: str) -> str:
    """``text`` with control characters escaped: names from images reach terminals and logs,
    and an escape sequence in a backing-file name must not drive the user's terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def resolve_reference(
    referrer: str | None, name: str, what: str, policy: ReferencePolicy | None = None
) -> str:
    """The real path of the file that ``referrer`` (an image's path, or None for an image that
    is not a local file) names as ``name``; FormatError naming both when it is not allowed."""
    policy = policy or current_policy()
    shown = printable(name)
    if referrer is None:
        raise FormatError(
            None,
            f"{what} {shown!r}: an image that is not a local file may not refer to other files",
        )
    if not name or "\0" in name:
        raise FormatError(referrer, f"{what} {shown!r} is not a file name")
    if name.startswith("json:") or "://" in name:
        raise FormatError(referrer, f"{what} {shown!r} is not a local file")
    home = os.path.dirname(os.path.realpath(referrer))
    target = os.path.realpath(os.path.join(home, name))  # an absolute name stays absolute
    allowed = (
        policy.allow_outside
        or _inside(target, home)
        or any(_inside(target, os.path.realpath(r)) for r in policy.roots)
        or (
            # a repository chain: export dir -> sibling export dir of the same VM
            policy.repository_chains
            and _is_export_dir(home)
            and os.path.dirname(os.path.dirname(target)) == os.path.dirname(home)
            and _is_export_dir(os.path.dirname(target))
        )
    )
    if not allowed:
        raise FormatError(
            referrer,
            f"{what} {shown!r} resolves to {printable(target)}, outside the image's directory "
            f"{printable(home)}: refused (an image must not reach other files; pass "
            "--allow-backing-outside if you trust it)",
        )
    return target


def require_regular(path: str, what: str) -> None:
    """A referenced file (backing, extent, href) must be a regular file: never a device."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FormatError(path, f"{what} does not exist") from None
    except OSError as exc:
        raise FormatError(path, f"{what}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise FormatError(path, f"{what} is not a regular file")
