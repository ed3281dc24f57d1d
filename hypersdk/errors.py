"""Typed errors. Each carries a message a user can act on; the CLI prints it as one line.

Each class declares, next to its exit code, whether a retry can heal it (``retryable``): network
hiccups and overloaded servers can, bad input, missing things, wrong keys and failed
verification cannot. Task retry policies read this; nothing keeps a separate list.
"""

from __future__ import annotations


class HyperSDKError(Exception):
    """Base of every error this project raises on purpose."""

    exit_code = 1
    retryable = False


class InvalidParameterError(HyperSDKError):
    """A parameter given by the user is malformed or out of range."""

    exit_code = 2


class FormatError(HyperSDKError):
    """A disk image is malformed, truncated or uses a feature we refuse."""

    def __init__(self, path: str | None, problem: str):
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path else problem)


class UnsupportedFormatError(FormatError):
    """The format (or one of its features) is not supported."""


class SourceError(HyperSDKError):
    """Reading from a source (hypervisor, cloud, local directory) failed: a missing directory,
    a malformed VM description. (Network trouble is EndpointUnreachableError, a failed disk
    read DiskReadError: those heal with a retry.)"""

    retryable = False


class VMNotFoundError(SourceError):
    """The requested VM does not exist on the source."""

    retryable = False


class DiskReadError(SourceError):
    """A disk of the VM could not be read."""

    retryable = True


class SnapshotError(SourceError):
    """A snapshot could not be taken, used or removed."""

    retryable = False


class TargetError(HyperSDKError):
    """Writing to or reading from a storage target failed."""

    retryable = True


class TargetFullError(TargetError):
    """The target ran out of space; nothing was published under the final name."""

    retryable = False


class ObjectNotFoundError(TargetError):
    """The object asked for does not exist on the target."""

    retryable = False


class RepositoryLockedError(TargetError):
    """Another run holds the repository lock of a VM (or took it from us): waiting longer, or
    after that run, helps; retrying at once does not."""

    retryable = False


class CredentialsError(HyperSDKError):
    """Credentials are missing or were rejected."""


class EndpointUnreachableError(HyperSDKError):
    """A server could not be reached (wrong URL, network down, server gone)."""

    retryable = True


class CryptoError(HyperSDKError):
    """Base of encryption errors."""


class DecryptionError(CryptoError):
    """Ciphertext could not be authenticated: wrong key, or tampered/truncated data."""


class VerificationError(HyperSDKError):
    """An export does not match its manifest."""


class Interrupted(HyperSDKError):
    """The run was asked to stop (SIGTERM, SIGINT, a cancellation from the UI or API): the work
    stopped at its next block and the cleanup ran (hypersdk.cancel). Not a failure, and nothing
    a retry would heal."""

    exit_code = 130
