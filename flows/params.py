"""Typed flow parameters: the UI's run form, the API and plain Python calls all validate them.

Prefect builds each flow's parameter schema from its signature (types, enums, constraints) and
takes each field's description from the flow docstring's ``Args:`` section, so the flows keep
their parameter docs there, next to the types below.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from hypersdk.crypto.keys import KeySpec
from hypersdk.formats import output_formats
from hypersdk.windows import MAX_SPEC

# Every format a driver can write, as the run form's drop-down (and the API's enum).
WRITABLE_FORMATS = tuple(output_formats())
FormatName = Literal[WRITABLE_FORMATS]  # type: ignore[valid-type]

VmName = Annotated[str, Field(min_length=1, max_length=255)]
SourceUrl = Annotated[str | None, Field(min_length=1, max_length=4096)]
TargetUrl = Annotated[str | None, Field(min_length=1, max_length=4096)]
FormatOptions = dict[str, str]
FullEvery = Annotated[int, Field(ge=1, le=1000)]
# A key *reference*: where the key is, never the key.
EncryptionRef = KeySpec | None
# When a run may start, e.g. "Mon-Fri 22:00-06:00 Europe/Paris" (hypersdk/windows.py parses it,
# flows/window.py enforces it); None: any time.
TimeWindow = Annotated[str | None, Field(min_length=1, max_length=MAX_SPEC)]
# The work queue of the hypersdk-local pool a run goes to (deployments/queues.py).
Priority = Literal["urgent", "default", "bulk"]

PARAMETER_DOCS = """
        vm: The VM to export: its name or id on the source.
        source: Source URL: local:///dir (VM directories), vsphere://host/DC/vm/path (pyvmomi;
            credentials from GOVC_* or a Prefect Secret block), ova:///file.ova. Empty: the
            local VM directory ($HYPERSDK_HOME/vms).
        target: Target URL: file:///dir, s3://bucket/prefix, az://container/prefix,
            gs://bucket/prefix, with settings in the query (?storage_class=..., ?cache=none).
            Empty: $HYPERSDK_HOME/exports.
        format: Disk format of the export (qcow2 keeps incrementals as deltas).
        format_options: Format options as qemu-img names them, e.g. {"cluster_size": "65536"}.
        encryption: Encrypt the export: a key reference, never the key, e.g.
            {"method": "keyfile", "ref": "/etc/hypersdk/export.key"}; methods: keyfile,
            passphrase (a file), env (a variable), secret-block (a Prefect Secret), gpg.
        verify: Re-read the export after writing it and check every hash of its manifest.
        window: When the run may start: "22:00-06:00", optional seconds, days and IANA time
            zone ("Mon-Fri 22:00-06:00 Europe/Paris"; default UTC). A deployment run started
            outside it goes back to Scheduled at its next opening. Empty: any time.
"""
