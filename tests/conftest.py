"""Shared test setup. Fixtures live in tests/fixtures/, one module per concern."""

import os

# Offline and quiet before anything imports transformers or ray.
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "AWS_EC2_METADATA_DISABLED": "true",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)

pytest_plugins = [
    "tests.fixtures.paths",
    "tests.fixtures.storage",
    "tests.fixtures.assets",
    "tests.fixtures.ray_cluster",
    "tests.fixtures.serve_app",
]
