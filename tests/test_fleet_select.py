"""Fleet selection and limit naming (engine side, no Prefect): which VMs a selector picks, how
ordered groups split them, and limit names that identify an endpoint without showing secrets."""

from __future__ import annotations

import pytest

from deployments.limits import parse_pairs
from hypersdk.errors import InvalidParameterError
from hypersdk.fleet import (
    Selector,
    endpoint_key,
    plan_groups,
    select_vms,
    source_limit_name,
    target_limit_name,
)
from hypersdk.models import VMInfo


def _vm(name: str, **annotations: str) -> VMInfo:
    return VMInfo(name=name, id=name, annotations=annotations)


INVENTORY = [
    _vm("db01", tags="nightly, prod", folder="/DC/vm/prod/db", env="prod"),
    _vm("db02", tags="prod", folder="/DC/vm/prod/db", env="prod"),
    _vm("app01", tags="nightly", folder="/DC/vm/prod/app", env="prod"),
    _vm("app02", folder="/DC/vm/test", env="test"),
    _vm("web01"),
]


def test_selector_patterns_tags_and_folder():
    assert select_vms(INVENTORY, Selector()) == ["app01", "app02", "db01", "db02", "web01"]
    assert select_vms(INVENTORY, Selector(names=["db*", "web?1"])) == ["db01", "db02", "web01"]
    assert select_vms(INVENTORY, Selector(names=["*"], exclude=["app*"])) == [
        "db01",
        "db02",
        "web01",
    ]
    assert select_vms(INVENTORY, Selector(tags=["nightly"])) == ["app01", "db01"]
    assert select_vms(INVENTORY, Selector(tags=["nightly", "env=prod"])) == ["app01", "db01"]
    assert select_vms(INVENTORY, Selector(tags=["env=test"])) == ["app02"]
    # a folder covers the folders under it, not a sibling sharing its prefix
    assert select_vms(INVENTORY, Selector(folder="/DC/vm/prod")) == ["app01", "db01", "db02"]
    assert select_vms(INVENTORY, Selector(folder="DC/vm/prod/db/")) == ["db01", "db02"]
    assert select_vms(
        INVENTORY + [_vm("x", folder="/DC/vm/production")], Selector(folder="/DC/vm/prod")
    ) == ["app01", "db01", "db02"]
    assert select_vms(INVENTORY, Selector(names=["DB*"])) == []  # case-sensitive
    with pytest.raises(ValueError):
        Selector.model_validate({"names": ["a"], "colour": "red"})  # a typo is an error


def test_ordered_groups():
    vms = ["app01", "db01", "web01", "db02", "app02", "db01"]
    assert plan_groups(vms, [["db*"], ["app*"]]) == [
        ["db01", "db02"],
        ["app01", "app02"],
        ["web01"],  # matched by no group: last
    ]
    # first matching group wins; empty groups vanish; no groups: one group, duplicates once
    assert plan_groups(vms, [["*01"], ["db*"], ["nothing*"]]) == [
        ["app01", "db01", "web01"],
        ["db02"],
        ["app02"],
    ]
    assert plan_groups(vms, None) == [["app01", "db01", "web01", "db02", "app02"]]
    assert plan_groups([], [["a"]]) == []


def test_endpoint_names_are_stable_and_carry_no_secret():
    # one vCenter however the VM path, user or query is spelled
    a = source_limit_name("vsphere://admin@VC1.example.com/DC1/vm/db01?insecure=true")
    b = source_limit_name("vsphere://vc1.example.com/DC2/vm/other")
    assert a == b and a.startswith("hypersdk-source:vsphere:")
    assert source_limit_name("vsphere://vc2.example.com/DC1") != a
    assert source_limit_name("vsphere://vc1.example.com:8443/DC1") != a
    # local directories: the normalised path
    assert source_limit_name("local:///srv/vms/") == source_limit_name("local:///srv/./vms")
    assert source_limit_name("/srv/vms") == source_limit_name("local:///srv/vms")
    assert source_limit_name("local:///srv/vms") != source_limit_name("local:///srv/other")
    # a target and a source on the same place are different limits
    assert target_limit_name("file:///srv/vms") != source_limit_name("file:///srv/vms")
    # nothing of the URL but its scheme shows: no host, no user, no path, no query value
    for url in (
        "vsphere://admin@vc-secret-host.corp/DC/vm/x?token=abc",
        "s3://private-bucket/prefix?secret_access_key=SHOULDNOTSHOW",
        "local:///home/alice/secret-project/vms",
    ):
        name = source_limit_name(url)
        for part in ("admin", "vc-secret", "corp", "private", "SHOULDNOTSHOW", "alice", "abc"):
            assert part not in name, (url, name)
        assert len(name) < 64
    assert endpoint_key("vsphere://user@h.example/DC") == "vsphere://h.example"
    with pytest.raises(InvalidParameterError):
        endpoint_key("")


def test_limit_pairs_from_the_command_line():
    assert parse_pairs(["local:///srv/vms=4", "s3://b/p?storage_class=X=8"]) == {
        "local:///srv/vms": 4,
        "s3://b/p?storage_class=X": 8,
    }
    for bad in ("local:///srv/vms", "local:///srv/vms=0", "=3", "x=many"):
        with pytest.raises(SystemExit):
            parse_pairs([bad])


def test_k8s_job_template_uses_only_declared_variables():
    """The sample Kubernetes base job template: every {{ placeholder }} is a declared variable
    (Prefect fills only those), the job never retries on its own (Prefect re-runs), and it
    carries no credential (they come from a Kubernetes Secret)."""
    import json
    import re
    from pathlib import Path

    text = (Path(__file__).parent.parent / "deployments" / "k8s-job-template.json").read_text()
    template = json.loads(text)
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(template["job_configuration"])))
    declared = set(template["variables"]["properties"])
    assert used <= declared, used - declared
    spec = template["job_configuration"]["job_manifest"]["spec"]
    assert spec["backoffLimit"] == 0
    container = spec["template"]["spec"]["containers"][0]
    assert {"name": "HYPERSDK_REQUIRE_LIMITS", "value": "1"} in container["env"]
    assert container["envFrom"][0]["secretRef"]["name"] == "hypersdk-credentials"
    assert not re.search(r"(?i)password|secret_access_key|token\"\s*:", text)
