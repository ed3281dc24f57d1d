"""The data plane: a snapshot's page ranges (all of them, or the diff against a previous
snapshot) as an ExtentMap, and ranged reads of its page blob through the access SAS.

Page ranges are 512-byte aligned; the map widens data to 64 KiB (reading a few more bytes of
the snapshot is always correct and saves requests). Cleared pages of a diff (TRIM) become zero
extents where they cover whole 64 KiB blocks, data elsewhere (read as the zeros they hold).
The SAS URL is used only here and never appears in a message: readers are named by snapshot.
"""

from __future__ import annotations

from hypersdk.errors import CredentialsError, DiskReadError, SourceError
from hypersdk.extents import Extent, ExtentMap
from providers.vsphere.download import DatastoreReader

ALIGN = 64 * 1024


def _blob(sas_url: str):
    from azure.storage.blob import BlobClient

    return BlobClient.from_blob_url(sas_url, retry_total=3)


def _storage_errors(what: str):
    import contextlib

    from azure.core.exceptions import AzureError, ClientAuthenticationError, HttpResponseError

    @contextlib.contextmanager
    def wrapped():
        try:
            yield
        except ClientAuthenticationError:
            raise CredentialsError(f"{what}: access SAS refused") from None
        except HttpResponseError as exc:
            code = getattr(exc.error_code, "value", exc.error_code) or exc.status_code
            if exc.status_code == 403:
                raise CredentialsError(f"{what}: access SAS refused ({code})") from None
            raise SourceError(f"{what}: {code}") from None
        except AzureError as exc:
            raise DiskReadError(f"{what}: {type(exc).__name__}") from None

    return wrapped()


def to_map(size: int, pages: list[dict], clears: list[dict] = ()) -> ExtentMap:
    """An ExtentMap of a disk of ``size`` from page ranges ({start, end} inclusive)."""
    data, zero = [], []
    for r in pages:
        data.append((int(r["start"]), int(r["end"]) + 1))
    for r in clears:
        start, end = int(r["start"]), int(r["end"]) + 1
        inner_start, inner_end = -(-start // ALIGN) * ALIGN, end // ALIGN * ALIGN
        if inner_end > inner_start:
            zero.append((inner_start, inner_end))
            data += [(start, inner_start), (inner_end, end)]
        else:
            data.append((start, end))
    extents = [Extent(s, min(e, size) - s) for s, e in data if min(e, size) > s] + [
        Extent(s, min(e, size) - s, True) for s, e in zero if min(e, size) > s
    ]
    merged = ExtentMap(size, _disjoint(extents))
    return merged.aligned(ALIGN)


def _disjoint(extents: list[Extent]) -> list[Extent]:
    """Sorted; overlapping data merged (Azure's ranges never overlap; a hostile answer may)."""
    out: list[Extent] = []
    for e in sorted(extents, key=lambda x: (x.offset, x.zero)):
        if out and e.offset < out[-1].end:
            last = out[-1]
            if last.zero == e.zero:
                out[-1] = Extent(last.offset, max(last.end, e.end) - last.offset, last.zero)
            else:  # data and zero overlapping: data wins (read what the snapshot holds)
                start, end = min(last.offset, e.offset), max(last.end, e.end)
                out[-1] = Extent(start, end - start)
            continue
        out.append(e)
    return out


def all_pages(sas_url: str, size: int, what: str) -> ExtentMap:
    with _storage_errors(what):  # paged: a fragmented disk's list comes in parts
        pages = [
            {"start": r.start, "end": r.end}
            for r in _blob(sas_url).list_page_ranges()
            if not r.cleared
        ]
    return to_map(size, pages)


def diff_pages(sas_url: str, previous_sas_url: str, size: int, what: str) -> ExtentMap:
    """Pages changed since the previous snapshot (``previous_snapshot_url``, managed disks)."""
    with _storage_errors(what):
        pages, clears = _blob(sas_url).get_page_range_diff_for_managed_disk(previous_sas_url)
    return to_map(size, pages, clears)


class SnapshotReader(DatastoreReader):
    """Ranged GETs of a snapshot's page blob (several in flight, resumed when broken); closing
    it runs ``on_close`` (which revokes the access) whatever happened."""

    def __init__(self, client, sas_url: str, size: int, *, name: str, on_close, **kwargs):
        self._on_close = on_close
        try:
            super().__init__(client, sas_url, size, name=name, file_size=size, **kwargs)
        except BaseException:
            on_close()
            raise

    def _headers(self, extra: dict) -> dict:
        return {**extra, "x-ms-version": "2021-08-06"}

    def _check_status(self, r, what: str) -> None:
        if r.status_code in (401, 403):
            raise CredentialsError(f"{self.name}: access SAS refused (HTTP {r.status_code})")
        if r.status_code == 404:
            raise DiskReadError(f"{self.name}: snapshot blob not found (HTTP 404)")
        super()._check_status(r, what)

    def close(self) -> None:
        try:
            super().close()
        finally:
            on_close, self._on_close = self._on_close, None
            if on_close is not None:
                on_close()
