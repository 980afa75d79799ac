"""Shared test setup. Fixtures live in tests/fixtures/, one module per concern."""

import os

import pytest

# imported below before pytest loads it as a plugin: keep its asserts rewritten
pytest.register_assert_rewrite("tests.fixtures")

from tests.fixtures.storage import FAKE_AWS_ENV  # noqa: E402

# Offline and quiet before anything imports transformers or ray. Fake AWS credentials for the whole
# session (tests talk to moto's local S3 only, never to AWS): Ray workers inherit them whenever the
# shared cluster starts, as a real cluster's workers have theirs (Ray Data's parquet sampling tasks
# take no runtime_env, so credentials set after ray.init never reached them).
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)
os.environ.update(FAKE_AWS_ENV)

pytest_plugins = [
    "tests.fixtures.paths",
    "tests.fixtures.storage",
    "tests.fixtures.assets",
    "tests.fixtures.ray_cluster",
    "tests.fixtures.serve_app",
]
