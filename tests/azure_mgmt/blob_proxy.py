"""A small HTTP proxy in front of Azurite that corrects its page-range diff and revokes SAS.

Everything is forwarded to Azurite unchanged (Azurite checks the auth, the blob and the range),
with three documented corrections (tests/azure_mgmt/README.md):

* Page-range diff. Azure answers ``GET ?comp=pagelist`` with ``prevsnapshot=`` (or, for managed
  disks, the ``x-ms-previous-snapshot-url`` header) with only the pages written or cleared
  between the two snapshots. Azurite answers every valid range of the target instead (Azurite
  issue 812). The proxy records the page writes and clears it forwards (``PUT ?comp=page``) and
  the snapshots it forwards (``PUT ?comp=snapshot``), so it knows what was written between any
  two snapshots, and replaces the diff's body by exactly that: the last write of each page in
  the window decides whether it is a PageRange (written) or a ClearRange (cleared). A previous
  snapshot it never saw, or that was deleted, is answered as Azure does for a missing previous
  snapshot: 404 ``PreviousSnapshotNotFound``.
* SAS revocation. Azure invalidates a disk's access SAS when access is revoked; a SAS made with
  the account key stays valid in Azurite until it expires. A request carrying a ``sig`` is
  forwarded only while the fake management plane holds the grant it belongs to (``grant`` /
  ``revoke``); otherwise it is answered 403 ``AuthenticationFailed``, as Azure does.
* ``hold``: tests can make data GETs of a blob wait (to kill a run mid-download, deterministic).
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

CHUNK = 1 << 20
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


def _paint(spans: list[tuple[int, int, bool]], start: int, end: int, clear: bool) -> None:
    """Record [start, end) as last written (clear=False) or cleared, over older spans."""
    out: list[tuple[int, int, bool]] = []
    for s, e, c in spans:
        if e <= start or s >= end:
            out.append((s, e, c))
            continue
        if s < start:
            out.append((s, start, c))
        if e > end:
            out.append((end, e, c))
    out.append((start, end, clear))
    out.sort()
    spans[:] = out


def diff_spans(ops: list[tuple[int, int, bool]]) -> list[tuple[int, int, bool]]:
    """The pages the writes ``ops`` (in order) leave written or cleared, merged, ascending."""
    spans: list[tuple[int, int, bool]] = []
    for start, end, clear in ops:
        _paint(spans, start, end, clear)
    merged: list[tuple[int, int, bool]] = []
    for s, e, c in spans:
        if merged and merged[-1][1] == s and merged[-1][2] == c:
            merged[-1] = (merged[-1][0], e, c)
        else:
            merged.append((s, e, c))
    return merged


def pagelist_xml(spans: list[tuple[int, int, bool]]) -> bytes:
    parts = ['<?xml version="1.0" encoding="utf-8"?><PageList>']
    for s, e, c in spans:
        tag = "ClearRange" if c else "PageRange"
        parts.append(f"<{tag}><Start>{s}</Start><End>{e - 1}</End></{tag}>")
    parts.append("</PageList>")
    return "".join(parts).encode()


def _error(code: str, message: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code>'
        f"<Message>{escape(message)}</Message></Error>"
    ).encode()


class BlobProxy:
    """The proxy's state (write log, snapshots, grants) and its server thread."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.lock = threading.Lock()
        self.ops: dict[str, list[tuple[int, int, bool]]] = {}  # blob path -> page ops in order
        self.snaps: dict[tuple[str, str], int] = {}  # (blob path, snapshot) -> len(ops) then
        self.grants: set[tuple[str, str, str]] = set()  # (blob path, snapshot, sig)
        self.issued: set[str] = set()  # every sig ever granted (tests look for leaks)
        self.held: dict[str, threading.Event] = {}  # blob path -> released when set
        self.seen_gets: dict[str, int] = {}  # blob path -> data GETs received (for tests)
        self.diffs_corrected = 0
        self.correct_diffs = True  # False: Azurite's own diff answer (every range), for tests
        handler = type("Handler", (_Handler,), {"proxy": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    # -- called by the fake management plane and by tests ----------------------------------------
    def grant(self, path: str, snapshot: str, sig: str) -> None:
        with self.lock:
            self.grants.add((path, snapshot, sig))
            self.issued.add(sig)

    def revoke(self, path: str, snapshot: str) -> None:
        with self.lock:
            self.grants = {g for g in self.grants if (g[0], g[1]) != (path, snapshot)}

    def forget_snapshot(self, path: str, snapshot: str) -> None:
        with self.lock:
            self.snaps.pop((path, snapshot), None)

    def active_grants(self) -> set[tuple[str, str]]:
        with self.lock:
            return {(p, s) for p, s, _ in self.grants}

    def hold(self, path: str) -> threading.Event:
        event = threading.Event()
        with self.lock:
            self.held[path] = event
        return event

    def stop(self) -> None:
        for event in list(self.held.values()):
            event.set()
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    proxy: BlobProxy
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args) -> None:  # quiet
        pass

    def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for k, v in headers:
            if k.lower() not in _HOP and k.lower() != "content-length":
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _refuse(self, status: int, code: str, message: str) -> None:
        self._reply(
            status,
            [("Content-Type", "application/xml"), ("x-ms-error-code", code)],
            _error(code, message),
        )

    def _handle(self) -> None:
        proxy = self.proxy
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        comp = query.get("comp", "")
        snapshot = query.get("snapshot", "")
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""

        if "sig" in query:  # an access SAS: only while its grant lasts
            with proxy.lock:
                ok = (path, snapshot, query["sig"]) in proxy.grants
            if not ok:
                self._refuse(
                    403, "AuthenticationFailed", "the access SAS was revoked or never granted"
                )
                return

        diff_from = None
        if self.command == "GET" and comp == "pagelist":
            prev_url = self.headers.get("x-ms-previous-snapshot-url")
            if prev_url:
                prev = urlsplit(prev_url)
                prev_q = {k: v[-1] for k, v in parse_qs(prev.query).items()}
                diff_from = (unquote(prev.path), prev_q.get("snapshot", ""))
            elif "prevsnapshot" in query:
                diff_from = (path, query["prevsnapshot"])
            if diff_from is not None:
                with proxy.lock:
                    known = diff_from in proxy.snaps and diff_from[0] == path
                if not known:
                    self._refuse(
                        404, "PreviousSnapshotNotFound", "the previous snapshot does not exist"
                    )
                    return

        if self.command == "GET" and not comp and "restype" not in query:
            with proxy.lock:
                proxy.seen_gets[path] = proxy.seen_gets.get(path, 0) + 1
                held = proxy.held.get(path)
            if held is not None:
                held.wait(60)

        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            status, rheaders = resp.status, resp.getheaders()
            if diff_from is not None and status == 200 and proxy.correct_diffs:
                resp.read()  # Azurite's answer (every range): replaced by the real diff
                self._reply(status, rheaders, self._diff(path, snapshot, diff_from))
                return
            if self.command == "PUT" and status == 201:
                self._record(path, query, comp, rheaders)
            if resp.getheader("Content-Length") is None:  # chunked upstream: small answers
                self._reply(status, rheaders, resp.read())
                return
            self.send_response(status)
            for k, v in rheaders:
                if k.lower() not in _HOP:
                    self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                while chunk := resp.read(CHUNK):
                    self.wfile.write(chunk)
        finally:
            conn.close()

    def _record(self, path: str, query: dict, comp: str, rheaders) -> None:
        proxy = self.proxy
        h = {k.lower(): v for k, v in rheaders}
        with proxy.lock:
            if comp == "page":
                rng = self.headers.get("x-ms-range") or self.headers.get("Range") or ""
                start, _, end = rng.removeprefix("bytes=").partition("-")
                clear = (self.headers.get("x-ms-page-write") or "").lower() == "clear"
                proxy.ops.setdefault(path, []).append((int(start), int(end) + 1, clear))
            elif comp == "snapshot" and "x-ms-snapshot" in h:
                proxy.snaps[(path, h["x-ms-snapshot"])] = len(proxy.ops.get(path, []))
            elif not comp and (self.headers.get("x-ms-blob-type") or "") == "PageBlob":
                proxy.ops[path] = []  # a new page blob: no writes yet

    def _diff(self, path: str, snapshot: str, prev: tuple[str, str]) -> bytes:
        proxy = self.proxy
        with proxy.lock:
            ops = proxy.ops.get(path, [])
            start = proxy.snaps[prev]
            end = proxy.snaps.get((path, snapshot), len(ops)) if snapshot else len(ops)
            window = list(ops[start:end])
            proxy.diffs_corrected += 1
        return pagelist_xml(diff_spans(window))

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _handle
