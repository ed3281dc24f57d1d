"""Cloud sources against their emulators: MB/s of a disk export from Azurite (Azure source) and
from fake-gcs-server (GCP source) next to the emulator's own raw download of the same bytes, in
the same run; the ratio says what our path adds (issue 15).

Usage: ``python -m benchmarks.clouds [SIZE_MIB]`` (default 1024). Each half lives in its own
module (benchmarks/_cloud_azure.py, benchmarks/_cloud_gcp.py) and starts its own emulators on
127.0.0.1; the figures and their method are in docs/azure.md and docs/gcp.md.
"""

from __future__ import annotations

import json
import sys

MiB = 1024 * 1024


def main(argv: list[str]) -> int:
    size = int(argv[0]) * MiB if argv else 1024 * MiB
    from benchmarks import _cloud_azure, _cloud_gcp

    results = {}
    for name, half in (("azure", _cloud_azure), ("gcp", _cloud_gcp)):
        print(f"== {name}: {size // MiB} MiB", file=sys.stderr)
        results[name] = half.run(size)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
