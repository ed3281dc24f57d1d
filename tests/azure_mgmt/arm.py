"""A fake of the Azure Resource Manager subset the azure-mgmt-compute client calls, over TLS.

It serves, for the real SDK client (ComputeManagementClient with ``base_url``), the endpoints
listed in tests/azure_mgmt/README.md (each with the REST API page it follows): VMs, VM sizes,
managed disks, incremental snapshots (create, get, list, delete) and snapshot access
(beginGetAccess / endGetAccess), the long-running ones with ``Azure-AsyncOperation`` and
``Location`` polling. Every call needs the bearer token the fake's App Service managed-identity
endpoint (plain http, as App Service's is) issued.

Disk data lives in Azurite (through tests/azure_mgmt/blob_proxy.py): a managed disk is a page
blob, an incremental snapshot a blob snapshot of it, an access grant a read SAS of that blob
snapshot (made with Azurite's account key) that the proxy honours until it is revoked.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
import secrets
import ssl
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

PROVIDER = "Microsoft.Compute"
LOCATION = "westeurope"
CONTAINER = "managed-disks"
PAGE = 2  # VMs per page of a list answer (the SDK follows nextLink)
SIZES = {
    "Standard_D2s_v3": (2, 8192),
    "Standard_D4s_v3": (4, 16384),
    "Standard_B1s": (1, 1024),
}
_RES = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)(?:/resourceGroups/(?P<rg>[^/]+))?"
    r"/providers/Microsoft\.Compute/(?P<kind>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<rest>.+))?$",
    re.I,
)


def make_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (and localhost): (cert.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hypersdk test ARM")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "arm-cert.pem", directory / "arm-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class ArmError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class FakeArm:
    """State of the fake cloud and its two servers (ARM over TLS, identity over http)."""

    def __init__(self, blob_account_url: str, account: str, account_key: str, proxy, tmp: Path):
        from azure.storage.blob import BlobServiceClient

        self.account, self.account_key = account, account_key
        self.blob_url = blob_account_url  # through the proxy
        self.proxy = proxy
        self.blobs = BlobServiceClient(
            blob_account_url, credential={"account_name": account, "account_key": account_key}
        )
        self.blobs.create_container(CONTAINER)
        self.lock = threading.RLock()
        self.subscriptions: dict[str, dict[str, dict]] = {}  # sub -> rg -> {vms, disks, snapshots}
        self.operations: dict[str, dict] = {}
        self.tokens: set[str] = set()
        self.identity_secret = secrets.token_hex(16)
        self.calls: list[tuple[str, str]] = []  # (method, path) for tests
        self.delete_refusals = 0
        self.cert, key = make_cert(tmp)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, key)
        self.arm = ThreadingHTTPServer(("127.0.0.1", 0), type("H", (_ArmHandler,), {"arm": self}))
        self.arm.daemon_threads = True
        self.arm.socket = ctx.wrap_socket(self.arm.socket, server_side=True)
        self.identity = ThreadingHTTPServer(
            ("127.0.0.1", 0), type("I", (_IdentityHandler,), {"arm": self})
        )
        self.identity.daemon_threads = True
        for server in (self.arm, self.identity):
            threading.Thread(target=server.serve_forever, daemon=True).start()

    # -- for tests ---------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.arm.server_address[1]}"

    def identity_env(self) -> dict[str, str]:
        """App Service managed identity, as DefaultAzureCredential reads it."""
        port = self.identity.server_address[1]
        return {
            "IDENTITY_ENDPOINT": f"http://127.0.0.1:{port}/msi/token",
            "IDENTITY_HEADER": self.identity_secret,
        }

    def stop(self) -> None:
        for server in (self.arm, self.identity):
            server.shutdown()
            server.server_close()

    def add_subscription(self) -> str:
        sub = str(uuid.uuid4())
        with self.lock:
            self.subscriptions[sub] = {}
        return sub

    def add_resource_group(self, sub: str, rg: str) -> None:
        with self.lock:
            self.subscriptions[sub][rg.lower()] = {"vms": {}, "disks": {}, "snapshots": {}}

    def _rg(self, sub: str, rg: str) -> dict:
        if sub not in self.subscriptions:
            raise ArmError(
                404, "SubscriptionNotFound", f"The subscription '{sub}' could not be found."
            )
        group = self.subscriptions[sub].get(rg.lower())
        if group is None:
            raise ArmError(
                404, "ResourceGroupNotFound", f"Resource group '{rg}' could not be found."
            )
        return group

    def rid(self, sub: str, rg: str, kind: str, name: str) -> str:
        return f"/subscriptions/{sub}/resourceGroups/{rg}/providers/{PROVIDER}/{kind}/{name}"

    def add_disk(self, sub: str, rg: str, name: str, size: int, hyperv: str = "V1") -> dict:
        blob = f"{sub[:8]}-{rg}-{name}".lower()
        self.blobs.get_blob_client(CONTAINER, blob).create_page_blob(size)
        disk = {
            "id": self.rid(sub, rg, "disks", name),
            "name": name,
            "type": f"{PROVIDER}/disks",
            "location": LOCATION,
            "sku": {"name": "Premium_LRS", "tier": "Premium"},
            "properties": {
                "creationData": {"createOption": "Empty"},
                "diskSizeGB": -(-size // 2**30),
                "diskSizeBytes": size,
                "hyperVGeneration": hyperv,
                "provisioningState": "Succeeded",
                "diskState": "Attached",
                "timeCreated": _now(),
            },
            "_blob": blob,
        }
        with self.lock:
            self._rg(sub, rg)["disks"][name.lower()] = disk
        return disk

    def add_vm(
        self,
        sub: str,
        rg: str,
        name: str,
        disks: dict[str, int],
        size: str = "Standard_D2s_v3",
        security_type: str | None = None,
        power: str = "running",
        os_type: str = "Linux",
    ) -> dict:
        """A VM whose first disk is the OS disk and the others data disks at LUN 0, 1..."""
        made = [
            self.add_disk(sub, rg, d, s, "V2" if security_type else "V1") for d, s in disks.items()
        ]

        def managed(d: dict) -> dict:
            return {"id": d["id"], "storageAccountType": "Premium_LRS"}

        os_disk, data = made[0], made[1:]
        props = {
            "vmId": str(uuid.uuid4()),
            "hardwareProfile": {"vmSize": size},
            "storageProfile": {
                "osDisk": {
                    "osType": os_type,
                    "name": os_disk["name"],
                    "createOption": "FromImage",
                    "caching": "ReadWrite",
                    "managedDisk": managed(os_disk),
                    "diskSizeGB": os_disk["properties"]["diskSizeGB"],
                },
                "dataDisks": [
                    {
                        "lun": lun,
                        "name": d["name"],
                        "createOption": "Attach",
                        "caching": "None",
                        "managedDisk": managed(d),
                        "diskSizeGB": d["properties"]["diskSizeGB"],
                    }
                    for lun, d in enumerate(data)
                ],
            },
            "networkProfile": {
                "networkInterfaces": [
                    {
                        "id": f"/subscriptions/{sub}/resourceGroups/{rg}/providers/"
                        f"Microsoft.Network/networkInterfaces/{name}-nic0",
                        "properties": {"primary": True},
                    }
                ]
            },
            "provisioningState": "Succeeded",
        }
        if security_type:
            props["securityProfile"] = {
                "securityType": security_type,
                "uefiSettings": {"secureBootEnabled": True, "vTpmEnabled": True},
            }
        vm = {
            "id": self.rid(sub, rg, "virtualMachines", name),
            "name": name,
            "type": f"{PROVIDER}/virtualMachines",
            "location": LOCATION,
            "properties": props,
            "_power": power,
        }
        with self.lock:
            self._rg(sub, rg)["vms"][name.lower()] = vm
        return vm

    def disk_blob(self, sub: str, rg: str, disk: str):
        with self.lock:
            blob = self._rg(sub, rg)["disks"][disk.lower()]["_blob"]
        return self.blobs.get_blob_client(CONTAINER, blob)

    def write(self, sub: str, rg: str, disk: str, offset: int, data: bytes) -> None:
        """A guest write: pages of ``data`` at ``offset`` (512-byte aligned), through the proxy."""
        client = self.disk_blob(sub, rg, disk)
        for pos in range(0, len(data), 4 * 2**20):
            piece = data[pos : pos + 4 * 2**20]
            client.upload_page(piece, offset=offset + pos, length=len(piece))

    def snapshot_names(self, sub: str, rg: str) -> list[str]:
        with self.lock:
            return sorted(s["name"] for s in self._rg(sub, rg)["snapshots"].values())

    def snapshot(self, sub: str, rg: str, name: str) -> dict:
        with self.lock:
            return self._rg(sub, rg)["snapshots"][name.lower()]

    # -- long-running operations -------------------------------------------------------------------
    def start_operation(self, sub: str, result: dict | None, status: int = 200) -> dict:
        """An operation accepted (202) and Succeeded at its first status poll."""
        op_id = str(uuid.uuid4())
        base = (
            f"/subscriptions/{sub}/providers/{PROVIDER}/locations/{LOCATION}/DiskOperations/{op_id}"
        )
        with self.lock:
            self.operations[op_id] = {"polls": 0, "result": result, "status": status}
        return {
            "Azure-AsyncOperation": f"{self.url}{base}?api-version=2025-01-02",
            "Location": f"{self.url}{base}?monitor=true&api-version=2025-01-02",
        }

    def poll(self, op_id: str, monitor: bool) -> tuple[int, dict | None]:
        with self.lock:
            op = self.operations.get(op_id)
            if op is None:
                raise ArmError(404, "NotFound", "operation not found")
            if monitor:  # the Location URL: the operation's result once it is done
                if op["polls"] < 1:
                    return 202, None
                return op["status"], op["result"]
            op["polls"] += 1
        return 200, {
            "name": op_id,
            "status": "Succeeded",
            "startTime": _now(),
            **({"properties": {"output": op["result"]}} if op["result"] else {}),
        }

    # -- resources ---------------------------------------------------------------------------------
    def vm_view(self, vm: dict, expand: bool) -> dict:
        out = {k: v for k, v in vm.items() if not k.startswith("_")}
        if expand:
            out = json.loads(json.dumps(out))
            out["properties"]["instanceView"] = {
                "statuses": [
                    {"code": "ProvisioningState/succeeded", "level": "Info"},
                    {"code": f"PowerState/{vm['_power']}", "level": "Info"},
                ]
            }
        return out

    def create_snapshot(self, sub: str, rg: str, name: str, body: dict) -> tuple[int, dict, dict]:
        props = body.get("properties") or {}
        source = (props.get("creationData") or {}).get("sourceResourceId", "")
        if (props.get("creationData") or {}).get("createOption") != "Copy" or not source:
            raise ArmError(400, "InvalidParameter", "creationData.createOption must be Copy")
        if not props.get("incremental"):
            raise ArmError(400, "InvalidParameter", "only incremental snapshots are faked")
        m = _RES.match(source)
        if not m or m["kind"].lower() != "disks":
            raise ArmError(400, "InvalidParameter", f"sourceResourceId {source} is not a disk")
        with self.lock:
            group = self._rg(sub, rg)
            if name.lower() in group["snapshots"]:
                raise ArmError(409, "Conflict", f"snapshot {name} exists (updates are not faked)")
            disk = self._rg(m["sub"], m["rg"])["disks"].get(m["name"].lower())
            if disk is None:
                raise ArmError(404, "ResourceNotFound", f"disk {m['name']} not found")
        blob = self.blobs.get_blob_client(CONTAINER, disk["_blob"])
        taken = blob.create_snapshot()["snapshot"]  # through the proxy: it notes the position
        snap = {
            "id": self.rid(sub, rg, "snapshots", name),
            "name": name,
            "type": f"{PROVIDER}/snapshots",
            "location": body.get("location", LOCATION),
            "tags": body.get("tags") or {},
            "sku": {"name": "Standard_ZRS", "tier": "Standard"},
            "properties": {
                "creationData": {"createOption": "Copy", "sourceResourceId": disk["id"]},
                "incremental": True,
                "diskSizeGB": disk["properties"]["diskSizeGB"],
                "diskSizeBytes": disk["properties"]["diskSizeBytes"],
                "hyperVGeneration": disk["properties"]["hyperVGeneration"],
                "provisioningState": "Succeeded",
                "diskState": "Unattached",
                "timeCreated": _now(),
                "uniqueId": str(uuid.uuid4()),
            },
            "_blob": disk["_blob"],
            "_snapshot": taken,
        }
        with self.lock:
            group["snapshots"][name.lower()] = snap
        view = self.public(snap)
        view["properties"] = {**view["properties"], "provisioningState": "Creating"}
        return 202, view, self.start_operation(sub, None)

    @staticmethod
    def public(res: dict) -> dict:
        return json.loads(json.dumps({k: v for k, v in res.items() if not k.startswith("_")}))

    def grant(self, sub: str, rg: str, name: str, body: dict) -> tuple[int, dict | None, dict]:
        from azure.storage.blob import BlobSasPermissions, generate_blob_sas

        if (body.get("access") or "").lower() != "read":
            raise ArmError(400, "InvalidParameter", "access must be Read")
        seconds = int(body.get("durationInSeconds") or 0)
        if not 0 < seconds <= 5 * 86400:
            raise ArmError(400, "InvalidParameter", "durationInSeconds out of range")
        snap = self._snapshot(sub, rg, name)
        expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)
        sas = generate_blob_sas(
            self.account,
            CONTAINER,
            snap["_blob"],
            snapshot=snap["_snapshot"],
            account_key=self.account_key,
            permission=BlobSasPermissions(read=True),
            expiry=expiry,
        )
        sig = parse_qs(sas)["sig"][0]
        path = f"/{self.account}/{CONTAINER}/{snap['_blob']}"
        self.proxy.grant(path, snap["_snapshot"], sig)
        with self.lock:
            snap["properties"]["diskState"] = "ActiveSAS"
        url = f"{self.blob_url}/{CONTAINER}/{snap['_blob']}?snapshot={snap['_snapshot']}&{sas}"
        return 202, None, self.start_operation(sub, {"accessSAS": url})

    def revoke(self, sub: str, rg: str, name: str) -> tuple[int, dict | None, dict]:
        snap = self._snapshot(sub, rg, name)
        self.proxy.revoke(f"/{self.account}/{CONTAINER}/{snap['_blob']}", snap["_snapshot"])
        with self.lock:
            snap["properties"]["diskState"] = "Unattached"
        return 202, None, self.start_operation(sub, None)

    def delete_snapshot(self, sub: str, rg: str, name: str) -> tuple[int, dict | None, dict]:
        with self.lock:
            snap = self._rg(sub, rg)["snapshots"].get(name.lower())
            if snap is None:
                return 204, None, {}
            if snap["properties"]["diskState"] == "ActiveSAS":
                self.delete_refusals += 1
                raise ArmError(
                    409,
                    "OperationNotAllowed",
                    f"Snapshot {name} has an active SAS URI: revoke access before deleting it.",
                )
            del self._rg(sub, rg)["snapshots"][name.lower()]
        blob = self.blobs.get_blob_client(CONTAINER, snap["_blob"], snapshot=snap["_snapshot"])
        blob.delete_blob()
        self.proxy.forget_snapshot(
            f"/{self.account}/{CONTAINER}/{snap['_blob']}", snap["_snapshot"]
        )
        return 202, None, self.start_operation(sub, None)

    def _snapshot(self, sub: str, rg: str, name: str) -> dict:
        with self.lock:
            snap = self._rg(sub, rg)["snapshots"].get(name.lower())
        if snap is None:
            raise ArmError(
                404,
                "ResourceNotFound",
                f"The Resource '{PROVIDER}/snapshots/{name}' under resource group '{rg}' was not found.",
            )
        return snap

    def route(
        self, method: str, path: str, query: dict, body: dict
    ) -> tuple[int, dict | None, dict]:
        m = _RES.match(path)
        if not m:
            raise ArmError(404, "InvalidResourceType", f"no such path {path}")
        sub, rg, kind, name, rest = m["sub"], m["rg"], m["kind"].lower(), m["name"], m["rest"]
        if sub not in self.subscriptions:
            raise ArmError(
                404, "SubscriptionNotFound", f"The subscription '{sub}' could not be found."
            )
        if rg is None and kind == "locations" and rest and rest.lower() == "vmsizes":
            return (
                200,
                {
                    "value": [
                        {
                            "name": n,
                            "numberOfCores": c,
                            "memoryInMB": mem,
                            "maxDataDiskCount": 8,
                            "osDiskSizeInMB": 1047552,
                            "resourceDiskSizeInMB": 0,
                        }
                        for n, (c, mem) in SIZES.items()
                    ]
                },
                {},
            )
        if (
            rg is None
            and kind == "locations"
            and rest
            and rest.lower().startswith("diskoperations/")
        ):
            status, result = self.poll(rest.split("/", 1)[1], query.get("monitor") == "true")
            return status, result, {}
        if rg is None:
            raise ArmError(404, "InvalidResourceType", f"no such path {path}")
        group = self._rg(sub, rg)
        if kind == "virtualmachines" and method == "GET":
            expand = query.get("$expand") == "instanceView"
            if name is None:
                vms = [self.vm_view(v, expand) for _, v in sorted(group["vms"].items())]
                start = int(query.get("$skiptoken") or 0)
                page = {"value": vms[start : start + PAGE]}
                if start + PAGE < len(vms):
                    page["nextLink"] = (
                        f"{self.url}{path}?api-version={query.get('api-version')}"
                        f"&$skiptoken={start + PAGE}" + ("&$expand=instanceView" if expand else "")
                    )
                return 200, page, {}
            vm = group["vms"].get(name.lower())
            if vm is None:
                raise ArmError(
                    404,
                    "ResourceNotFound",
                    f"The Resource '{PROVIDER}/virtualMachines/{name}' under resource group '{rg}' was not found.",
                )
            return 200, self.vm_view(vm, expand), {}
        if kind == "disks" and method == "GET" and name:
            disk = group["disks"].get(name.lower())
            if disk is None:
                raise ArmError(
                    404,
                    "ResourceNotFound",
                    f"The Resource '{PROVIDER}/disks/{name}' was not found.",
                )
            return 200, self.public(disk), {}
        if kind == "snapshots":
            if name is None and method == "GET":
                return 200, {"value": [self.public(s) for s in group["snapshots"].values()]}, {}
            if rest is None and method == "GET":
                return 200, self.public(self._snapshot(sub, rg, name)), {}
            if rest is None and method == "PUT":
                return self.create_snapshot(sub, rg, name, body)
            if rest is None and method == "DELETE":
                return self.delete_snapshot(sub, rg, name)
            if rest and rest.lower() == "begingetaccess" and method == "POST":
                return self.grant(sub, rg, name, body)
            if rest and rest.lower() == "endgetaccess" and method == "POST":
                return self.revoke(sub, rg, name)
        raise ArmError(405, "MethodNotAllowed", f"{method} {path} is not faked")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


class _ArmHandler(BaseHTTPRequestHandler):
    arm: FakeArm
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: dict | None, headers: dict) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("x-ms-request-id", str(uuid.uuid4()))
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.arm.calls.append((self.command, parts.path))
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in self.arm.tokens:
            self._send(
                401,
                {"error": {"code": "AuthenticationFailed", "message": "Authentication failed."}},
                {},
            )
            return
        if "api-version" not in query:
            self._send(
                400,
                {
                    "error": {
                        "code": "MissingApiVersionParameter",
                        "message": "The api-version query parameter is required.",
                    }
                },
                {},
            )
            return
        try:
            body = json.loads(raw) if raw else {}
            status, result, headers = self.arm.route(self.command, parts.path, query, body)
        except ArmError as exc:
            self._send(exc.status, {"error": {"code": exc.code, "message": exc.message}}, {})
            return
        self._send(status, result, headers)

    do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = _handle


class _IdentityHandler(BaseHTTPRequestHandler):
    """App Service's managed-identity endpoint (api-version 2019-08-01): GET ?resource=..."""

    arm: FakeArm
    disable_nagle_algorithm = True

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        query = {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}
        if self.headers.get("X-IDENTITY-HEADER") != self.arm.identity_secret:
            status, body = 401, {"error": "invalid identity header"}
        elif query.get("api-version") != "2019-08-01" or not query.get("resource"):
            status, body = 400, {"error": "bad request"}
        else:
            token = f"fake-arm-token-{secrets.token_hex(12)}"
            self.arm.tokens.add(token)
            expires = int(datetime.datetime.now(datetime.UTC).timestamp()) + 3600
            status, body = (
                200,
                {
                    "access_token": token,
                    "expires_on": str(expires),
                    "resource": query["resource"],
                    "token_type": "Bearer",
                    "client_id": "00000000-0000-0000-0000-000000000000",
                },
            )
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
