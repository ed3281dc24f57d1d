"""A small HTTP server speaking the documented subset of the Compute Engine v1 REST API (and of
Cloud Build v1 and the OAuth token endpoint) that the GCP source calls, driven in tests by the
real google-cloud-compute client. Every route, with its reference page, is in ROUTES below;
tests/gcp_compute/README.md says where the fake differs from the service.

State is in memory and in a temporary directory of disk files (one per persistent disk, written
by the tests as a guest would). The image export build writes ``disk.raw`` in a tar.gz to a
bucket of fake-gcs-server, as the real builder writes to GCS.
"""

from __future__ import annotations

import gzip
import json
import re
import secrets
import shutil
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

GiB = 1024**3
BUILDER = "gcr.io/compute-image-import/gce_vm_image_export:release"
MACHINE_TYPES = {  # https://cloud.google.com/compute/docs/general-purpose-machines
    "e2-medium": (2, 4096),
    "n2-standard-2": (2, 8192),
    "n2-standard-4": (4, 16384),
}

# (method, path pattern, handler name, reference page)
C = r"/compute/v1/projects/(?P<project>[^/]+)"
Z = C + r"/zones/(?P<zone>[^/]+)"
REF = "https://cloud.google.com/compute/docs/reference/rest/v1"
ROUTES = [
    (
        "POST",
        r"/token",
        "token",
        "https://developers.google.com/identity/protocols/oauth2/web-server#offline",
    ),
    ("GET", Z + r"/instances", "instances_list", f"{REF}/instances/list"),
    ("GET", Z + r"/instances/(?P<name>[^/]+)", "instances_get", f"{REF}/instances/get"),
    ("GET", Z + r"/machineTypes/(?P<name>[^/]+)", "machine_types_get", f"{REF}/machineTypes/get"),
    ("GET", Z + r"/disks/(?P<name>[^/]+)", "disks_get", f"{REF}/disks/get"),
    ("POST", C + r"/global/snapshots", "snapshots_insert", f"{REF}/snapshots/insert"),
    ("GET", C + r"/global/snapshots/(?P<name>[^/]+)", "snapshots_get", f"{REF}/snapshots/get"),
    (
        "DELETE",
        C + r"/global/snapshots/(?P<name>[^/]+)",
        "snapshots_delete",
        f"{REF}/snapshots/delete",
    ),
    ("POST", C + r"/global/images", "images_insert", f"{REF}/images/insert"),
    ("GET", C + r"/global/images/(?P<name>[^/]+)", "images_get", f"{REF}/images/get"),
    ("DELETE", C + r"/global/images/(?P<name>[^/]+)", "images_delete", f"{REF}/images/delete"),
    (
        "GET",
        C + r"/global/operations/(?P<name>[^/]+)",
        "operations_get",
        f"{REF}/globalOperations/get",
    ),
    (
        "POST",
        C + r"/global/operations/(?P<name>[^/]+)/wait",
        "operations_get",
        f"{REF}/globalOperations/wait",
    ),
    ("GET", Z + r"/operations/(?P<name>[^/]+)", "operations_get", f"{REF}/zoneOperations/get"),
    (
        "POST",
        Z + r"/operations/(?P<name>[^/]+)/wait",
        "operations_get",
        f"{REF}/zoneOperations/wait",
    ),
    (
        "POST",
        r"/v1/projects/(?P<project>[^/]+)/builds",
        "builds_create",
        "https://cloud.google.com/build/docs/api/reference/rest/v1/projects.builds/create",
    ),
    (
        "GET",
        r"/v1/projects/(?P<project>[^/]+)/builds/(?P<name>[^/:]+)",
        "builds_get",
        "https://cloud.google.com/build/docs/api/reference/rest/v1/projects.builds/get",
    ),
    (
        "POST",
        r"/v1/projects/(?P<project>[^/]+)/builds/(?P<name>[^/:]+):cancel",
        "builds_cancel",
        "https://cloud.google.com/build/docs/api/reference/rest/v1/projects.builds/cancel",
    ),
]


class ApiError(Exception):
    def __init__(self, code: int, message: str, reason: str = "notFound"):
        self.code, self.message, self.reason = code, message, reason


@dataclass
class FakeDisk:
    name: str
    path: Path
    size: int

    def size_gb(self) -> int:
        return -(-self.size // GiB)  # see README: real disks are whole GiB


@dataclass
class State:
    root: Path
    project: str
    zone: str
    access_token: str = field(default_factory=lambda: "ya29.fake-" + secrets.token_hex(16))
    instances: dict = field(default_factory=dict)
    disks: dict = field(default_factory=dict)
    snapshots: dict = field(default_factory=dict)  # name -> (json, data file)
    images: dict = field(default_factory=dict)  # name -> (json, data file)
    operations: dict = field(default_factory=dict)
    builds: dict = field(default_factory=dict)
    calls: list = field(default_factory=list)
    fail_exports: bool = False
    export_delay: float = 0.0
    gcs_endpoint: str = ""
    public_pem: bytes = b""
    private_pem: str = ""
    private_key_id: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)
    ids: int = 1000


class FakeCompute:
    """The server and its state; ``start()`` binds a free 127.0.0.1 port."""

    def __init__(self, project: str, zone: str, gcs_endpoint: str):
        self.root = Path(tempfile.mkdtemp(prefix="fake-gce-"))
        self.state = State(self.root, project, zone)
        self.state.gcs_endpoint = gcs_endpoint
        self._server: ThreadingHTTPServer | None = None

    # -- test-side API ------------------------------------------------------------------------
    def start(self) -> None:
        state = self.state

        class Handler(_Handler):
            st = state

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        shutil.rmtree(self.root, ignore_errors=True)

    def add_instance(
        self,
        name: str,
        disk_sizes: dict[str, int],
        machine_type: str = "n2-standard-2",
        uefi: bool = True,
        status: str = "RUNNING",
    ) -> dict[str, Path]:
        """An instance with a persistent disk per entry (the first boots); returns the disk
        files, which tests write as the guest would."""
        st = self.state
        base = f"{self.endpoint}/compute/v1/projects/{st.project}/zones/{st.zone}"
        paths = {}
        attached = []
        for i, (dname, size) in enumerate(disk_sizes.items()):
            path = self.root / f"disk-{dname}.img"
            with open(path, "wb") as f:
                f.truncate(size)
            st.disks[dname] = FakeDisk(dname, path, size)
            paths[dname] = path
            entry = {
                "kind": "compute#attachedDisk",
                "type": "PERSISTENT",
                "mode": "READ_WRITE",
                "source": f"{base}/disks/{dname}",
                "deviceName": dname,
                "index": i,
                "boot": i == 0,
                "autoDelete": i == 0,
                "interface": "SCSI",
                "diskSizeGb": str(st.disks[dname].size_gb()),
            }
            if i == 0 and uefi:
                entry["guestOsFeatures"] = [{"type": "UEFI_COMPATIBLE"}, {"type": "GVNIC"}]
            attached.append(entry)
        st.ids += 1
        inst = {
            "kind": "compute#instance",
            "id": str(4_000_000_000_000_000 + st.ids),
            "name": name,
            "zone": f"{self.endpoint}/compute/v1/projects/{st.project}/zones/{st.zone}",
            "machineType": f"{base}/machineTypes/{machine_type}",
            "status": status,
            "disks": attached,
            "networkInterfaces": [
                {
                    "kind": "compute#networkInterface",
                    "name": "nic0",
                    "network": f"{self.endpoint}/compute/v1/projects/{st.project}/global/networks/default",
                    "networkIP": f"10.128.0.{st.ids % 250 + 2}",
                    "nicType": "GVNIC",
                }
            ],
            "selfLink": f"{base}/instances/{name}",
        }
        if uefi:
            inst["shieldedInstanceConfig"] = {
                "enableSecureBoot": True,
                "enableVtpm": True,
                "enableIntegrityMonitoring": True,
            }
        st.instances[name] = inst
        return paths

    def credentials_file(self, directory: Path) -> Path:
        """A service-account key file (what GOOGLE_APPLICATION_CREDENTIALS names) whose
        token_uri is this server's token endpoint: google-auth signs a JWT with the key and
        trades it there for an access token, as with Google's endpoint. (An authorized-user
        file would not do: google-auth always sends those to oauth2.googleapis.com.)"""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        self.state.public_pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.state.private_key_id = secrets.token_hex(20)
        self.state.private_pem = pem
        path = directory / "adc.json"
        path.write_text(
            json.dumps(
                {
                    "type": "service_account",
                    "project_id": self.state.project,
                    "private_key_id": self.state.private_key_id,
                    "private_key": pem,
                    "client_email": f"hypersdk@{self.state.project}.iam.gserviceaccount.com",
                    "client_id": "100000000000000000001",
                    "token_uri": f"{self.endpoint}/token",
                }
            )
        )
        return path

    def leftovers(self) -> dict[str, list[str]]:
        st = self.state
        with st.lock:
            return {"snapshots": sorted(st.snapshots), "images": sorted(st.images)}


class _Handler(BaseHTTPRequestHandler):
    st: State
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        for m, pattern, name, _ in ROUTES:
            match = re.fullmatch(pattern, parts.path)
            if m == method and match:
                handler = name
                break
        else:
            self._send(404, _error(404, f"no route {method} {parts.path}"))
            return
        try:
            if handler != "token":
                if not self._authorized():
                    raise ApiError(
                        401, "Request had invalid authentication credentials.", "authError"
                    )
                args = match.groupdict()
                if args.get("project") != self.st.project:
                    raise ApiError(
                        404, f"The resource 'projects/{args.get('project')}' was not found"
                    )
                if "zone" in args and args["zone"] != self.st.zone:
                    raise ApiError(
                        404,
                        f"The resource 'projects/{self.st.project}/zones/{args['zone']}' was not found",
                    )
            with self.st.lock:
                self.st.calls.append((method, parts.path))
            body = json.loads(raw) if raw and handler != "token" else {}
            code, answer = getattr(self, handler)(body=body, raw=raw, **match.groupdict())
        except ApiError as exc:
            self._send(exc.code, _error(exc.code, exc.message, exc.reason))
            return
        self._send(code, answer)

    def _authorized(self) -> bool:
        """An access token from /token, or a self-signed JWT of the service account (what
        google-auth sends when the client allows it: https://google.aip.dev/auth/4111)."""
        from google.auth import jwt

        auth = self.headers.get("Authorization", "")
        if auth == f"Bearer {self.st.access_token}":
            return True
        if not auth.startswith("Bearer ") or not self.st.public_pem:
            return False
        try:
            claims = jwt.decode(auth[7:], certs=self.st.public_pem, verify=True)
        except Exception:  # noqa: BLE001 - not a JWT of our key
            return False
        return str(claims.get("iss", "")).endswith(".iam.gserviceaccount.com")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # -- OAuth --------------------------------------------------------------------------------
    def token(self, raw: bytes, **_):
        """The JWT-bearer grant of a service account: the assertion must be signed by the key
        of the credentials file this fake wrote, for this endpoint."""
        from google.auth import jwt

        form = parse_qs(raw.decode())
        if form.get("grant_type") != ["urn:ietf:params:oauth:grant-type:jwt-bearer"]:
            return 400, {"error": "unsupported_grant_type"}
        try:
            claims = jwt.decode(
                form.get("assertion", [""])[0],
                certs=self.st.public_pem,
                # google-auth addresses the grant to Google's token endpoint wherever it sends it
                audience="https://oauth2.googleapis.com/token",
            )
        except Exception:  # noqa: BLE001 - any bad assertion
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
        if not str(claims.get("iss", "")).endswith(".iam.gserviceaccount.com"):
            return 400, {"error": "invalid_grant", "error_description": "Invalid issuer."}
        return 200, {
            "access_token": self.st.access_token,
            "expires_in": 3599,
            "token_type": "Bearer",
        }

    # -- Compute ------------------------------------------------------------------------------
    def _base(self) -> str:
        host = self.headers.get("Host")
        return f"http://{host}/compute/v1/projects/{self.st.project}"

    def instances_list(self, **_):
        items = list(self.st.instances.values())
        return 200, {"kind": "compute#instanceList", "items": items}

    def instances_get(self, name: str, zone: str, project: str, **_):
        try:
            return 200, self.st.instances[name]
        except KeyError:
            raise ApiError(
                404,
                f"The resource 'projects/{project}/zones/{zone}/instances/{name}' was not found",
            ) from None

    def machine_types_get(self, name: str, zone: str, project: str, **_):
        if name not in MACHINE_TYPES:
            raise ApiError(
                404,
                f"The resource 'projects/{project}/zones/{zone}/machineTypes/{name}' was not found",
            )
        cpus, mem = MACHINE_TYPES[name]
        return 200, {
            "kind": "compute#machineType",
            "name": name,
            "guestCpus": cpus,
            "memoryMb": mem,
        }

    def disks_get(self, name: str, zone: str, project: str, **_):
        disk = self.st.disks.get(name)
        if disk is None:
            raise ApiError(
                404, f"The resource 'projects/{project}/zones/{zone}/disks/{name}' was not found"
            )
        return 200, {
            "kind": "compute#disk",
            "name": name,
            "sizeGb": str(disk.size_gb()),
            "selfLink": f"{self._base()}/zones/{zone}/disks/{name}",
            "status": "READY",
        }

    def _operation(self, kind: str, target: str) -> dict:
        """A global operation, RUNNING when returned; DONE at its first get (its work is done
        at once), so the client's polling of operations.get really runs."""
        st = self.st
        with st.lock:
            st.ids += 1
            name = f"operation-{int(time.time() * 1000)}-{st.ids}"
            op = {
                "kind": "compute#operation",
                "id": str(st.ids),
                "name": name,
                "operationType": kind,
                "targetLink": target,
                "status": "RUNNING",
                "progress": 0,
                "selfLink": f"{self._base()}/global/operations/{name}",
            }
            st.operations[name] = op
        return dict(op)

    def operations_get(self, name: str, **_):
        with self.st.lock:
            op = self.st.operations.get(name)
            if op is None:
                raise ApiError(
                    404,
                    f"The resource 'projects/{self.st.project}/global/operations/{name}' was not found",
                )
            op.update(status="DONE", progress=100)
            return 200, dict(op)

    @staticmethod
    def _check_name(name: object) -> str:
        if not isinstance(name, str) or not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name):
            raise ApiError(400, f"Invalid value for field 'resource.name': '{name}'", "invalid")
        return name

    def snapshots_insert(self, body: dict, **_):
        name = self._check_name(body.get("name"))
        disk_name = str(body.get("sourceDisk", "")).rsplit("/", 1)[-1]
        disk = self.st.disks.get(disk_name)
        if disk is None:
            raise ApiError(404, f"The resource '{body.get('sourceDisk')}' was not found")
        with self.st.lock:
            if name in self.st.snapshots:
                raise ApiError(
                    409,
                    f"The resource 'projects/{self.st.project}/global/snapshots/{name}' already exists",
                    "alreadyExists",
                )
            copy = self.st.root / f"snapshot-{name}.img"
            shutil.copyfile(disk.path, copy)  # the point-in-time content
            self.st.snapshots[name] = (
                {
                    "kind": "compute#snapshot",
                    "name": name,
                    "sourceDisk": body["sourceDisk"],
                    "diskSizeGb": str(disk.size_gb()),
                    "status": "READY",
                    "labels": body.get("labels", {}),
                },
                copy,
            )
        return 200, self._operation("insert", f"{self._base()}/global/snapshots/{name}")

    def snapshots_get(self, name: str, **_):
        with self.st.lock:
            if name not in self.st.snapshots:
                raise ApiError(
                    404,
                    f"The resource 'projects/{self.st.project}/global/snapshots/{name}' was not found",
                )
            return 200, self.st.snapshots[name][0]

    def snapshots_delete(self, name: str, **_):
        with self.st.lock:
            found = self.st.snapshots.pop(name, None)
        if found is None:
            raise ApiError(
                404,
                f"The resource 'projects/{self.st.project}/global/snapshots/{name}' was not found",
            )
        found[1].unlink(missing_ok=True)
        return 200, self._operation("delete", f"{self._base()}/global/snapshots/{name}")

    def images_insert(self, body: dict, **_):
        name = self._check_name(body.get("name"))
        snap = str(body.get("sourceSnapshot", "")).rsplit("/", 1)[-1]
        with self.st.lock:
            if snap not in self.st.snapshots:
                raise ApiError(
                    404,
                    f"The resource 'projects/{self.st.project}/global/snapshots/{snap}' was not found",
                )
            if name in self.st.images:
                raise ApiError(
                    409,
                    f"The resource 'projects/{self.st.project}/global/images/{name}' already exists",
                    "alreadyExists",
                )
            copy = self.st.root / f"image-{name}.img"
            shutil.copyfile(self.st.snapshots[snap][1], copy)
            self.st.images[name] = (
                {
                    "kind": "compute#image",
                    "name": name,
                    "sourceSnapshot": body["sourceSnapshot"],
                    "status": "READY",
                    "labels": body.get("labels", {}),
                },
                copy,
            )
        return 200, self._operation("insert", f"{self._base()}/global/images/{name}")

    def images_get(self, name: str, **_):
        with self.st.lock:
            if name not in self.st.images:
                raise ApiError(
                    404,
                    f"The resource 'projects/{self.st.project}/global/images/{name}' was not found",
                )
            return 200, self.st.images[name][0]

    def images_delete(self, name: str, **_):
        with self.st.lock:
            found = self.st.images.pop(name, None)
        if found is None:
            raise ApiError(
                404, f"The resource 'projects/{self.st.project}/global/images/{name}' was not found"
            )
        found[1].unlink(missing_ok=True)
        return 200, self._operation("delete", f"{self._base()}/global/images/{name}")

    # -- Cloud Build: the image export builder --------------------------------------------------
    def builds_create(self, body: dict, project: str, **_):
        steps = body.get("steps") or []
        if len(steps) != 1 or steps[0].get("name") != BUILDER:
            raise ApiError(400, "only the gce_vm_image_export builder is faked", "invalid")
        args = dict(a.lstrip("-").split("=", 1) for a in steps[0].get("args", []) if "=" in a)
        image = args.get("source_image", "").rsplit("/", 1)[-1]
        dest = args.get("destination_uri", "")
        if not dest.startswith("gs://") or "/" not in dest[5:]:
            raise ApiError(400, "-destination_uri must be gs://BUCKET/OBJECT", "invalid")
        with self.st.lock:
            if image not in self.st.images:
                raise ApiError(
                    404, f"The resource 'projects/{project}/global/images/{image}' was not found"
                )
            self.st.ids += 1
            build_id = f"{self.st.ids:08x}-fake-build"
            build = {
                "id": build_id,
                "projectId": project,
                "status": "QUEUED",
                "steps": steps,
                "tags": body.get("tags", []),
            }
            self.st.builds[build_id] = build
            source = self.st.images[image][1]
        threading.Thread(target=_export, args=(self.st, build, source, dest), daemon=True).start()
        return 200, {
            "name": f"operations/build/{project}/{build_id}",
            "metadata": {
                "@type": "type.googleapis.com/google.devtools.cloudbuild.v1.BuildOperationMetadata",
                "build": dict(build),
            },
        }

    def builds_get(self, name: str, **_):
        with self.st.lock:
            if name not in self.st.builds:
                raise ApiError(404, f"build {name} not found")
            return 200, dict(self.st.builds[name])

    def builds_cancel(self, name: str, **_):
        with self.st.lock:
            build = self.st.builds.get(name)
            if build is None:
                raise ApiError(404, f"build {name} not found")
            if build["status"] in ("QUEUED", "WORKING"):
                build["status"] = "CANCELLED"
            return 200, dict(build)


def _export(st: State, build: dict, source: Path, dest: str) -> None:
    """What gce_vm_image_export produces by default: disk.raw in a gzipped tar, in the bucket."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    with st.lock:
        build["status"] = "WORKING"
    bucket, key = dest[5:].split("/", 1)
    try:
        deadline = time.monotonic() + st.export_delay
        while time.monotonic() < deadline:  # a slow worker VM; a cancelled build stops
            time.sleep(0.05)
            if build["status"] == "CANCELLED":
                return
        if st.fail_exports:
            raise RuntimeError("export workflow failed (test switch)")
        with tempfile.TemporaryDirectory(dir=st.root) as tmp:
            out = Path(tmp) / "image.tar.gz"
            with (
                gzip.open(out, "wb", compresslevel=1) as gz,
                tarfile.open(fileobj=gz, mode="w|", format=tarfile.GNU_FORMAT) as tar,
            ):
                tar.add(source, arcname="disk.raw")
            client = storage.Client(
                project="fake",
                credentials=AnonymousCredentials(),
                client_options={"api_endpoint": st.gcs_endpoint},
            )
            client.bucket(bucket).blob(key).upload_from_filename(
                str(out), content_type="application/gzip"
            )
        status, detail = "SUCCESS", ""
    except Exception as exc:  # noqa: BLE001 - the build's outcome
        status, detail = "FAILURE", f"step exited non-zero: {exc}"
    with st.lock:
        if build["status"] == "WORKING":
            build.update(status=status, statusDetail=detail)


def _error(code: int, message: str, reason: str = "notFound") -> dict:
    """Google's JSON error shape (https://cloud.google.com/apis/design/errors#http_mapping)."""
    return {
        "error": {
            "code": code,
            "message": message,
            "errors": [{"message": message, "domain": "global", "reason": reason}],
        }
    }
