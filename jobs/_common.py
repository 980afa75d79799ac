"""Config sections that several jobs share."""

from __future__ import annotations

from dataclasses import dataclass

from jobs._config import opt


@dataclass
class StorageConfig:
    """Where ``s3://`` URIs are served; local paths ignore this section.

    Credentials come from the standard AWS environment variables (AWS_ACCESS_KEY_ID, …).
    """

    endpoint_url: str | None = opt(
        None, "S3-compatible endpoint, e.g. http://127.0.0.1:9000 (MinIO, moto); null: AWS_ENDPOINT_URL or AWS."
    )
    region: str | None = opt(None, "S3 region; null: AWS_DEFAULT_REGION or us-east-1.")

    def options(self):
        """The :class:`tmr_core.storage.StorageOptions` every storage call takes."""
        from tmr_core.storage import StorageOptions

        return StorageOptions(endpoint_url=self.endpoint_url, region=self.region)
