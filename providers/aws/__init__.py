"""AWS source: EC2 instances exported through EBS snapshots and the EBS direct APIs.

``aws://REGION`` (providers/sources/aws.py registers it) and ``ebs://REGION/SNAPSHOT_ID`` (an EBS
snapshot as a raw image for ``hyperctl convert`` and ``hyperctl info``); see docs/aws.md.
"""
