"""The bucket lifecycle rule that expires sd3serve's images with their jobs (S3, MinIO, moto)."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("sd3serve.storage")

RULE_ID = "sd3serve-expire-images"


def expiry_rule(prefix: str, days: int) -> dict[str, Any]:
    return {"ID": RULE_ID, "Filter": {"Prefix": prefix}, "Status": "Enabled", "Expiration": {"Days": days}}


def ensure_expiry_rule(client: Any, bucket: str, prefix: str, days: int) -> bool:
    """Put our expiry rule on `bucket`, keeping any other rules it has. Returns whether it changed.

    A bucket whose policy forbids changing lifecycle rules keeps working: the refusal is logged
    (images then live until removed by DELETE /v1/jobs or an operator's own rule)."""
    from botocore.exceptions import BotoCoreError, ClientError

    wanted = expiry_rule(prefix, days)
    try:
        try:
            rules = client.get_bucket_lifecycle_configuration(Bucket=bucket).get("Rules", [])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NoSuchLifecycleConfiguration":
                raise
            rules = []
        ours = [r for r in rules if r.get("ID") == RULE_ID]
        if ours and ours[0].get("Expiration") == wanted["Expiration"] and ours[0].get("Filter") == wanted["Filter"]:
            return False
        others = [r for r in rules if r.get("ID") != RULE_ID]
        client.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": [*others, wanted]})
        log.info("bucket %s: images under %r expire after %d days", bucket, prefix, days)
        return True
    except (BotoCoreError, ClientError) as exc:
        log.warning("could not set the image expiry rule on bucket %s: %s", bucket, exc)
        return False
