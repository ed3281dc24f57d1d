"""AWS source (``aws://REGION``): EC2 instances through EBS snapshots and the EBS direct APIs.

The implementation lives in the providers/aws/ package (client, inventory, snapshots, blocks,
source); see docs/aws.md. ``IMAGE_OPENERS`` makes ``ebs://REGION/SNAPSHOT_ID`` an image URL
(``hyperctl convert``, ``hyperctl info``; providers.open_image_url).
"""

from __future__ import annotations

from providers.aws.source import AwsSource, open_image_url

SOURCE = AwsSource
IMAGE_OPENERS = {"ebs": open_image_url}

__all__ = ["IMAGE_OPENERS", "SOURCE", "AwsSource"]
