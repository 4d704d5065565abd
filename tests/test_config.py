"""The configuration model: file, environment, overrides, validation messages."""

from __future__ import annotations

import pytest

from kvtier.config import WriteMode, load_config
from kvtier.errors import ConfigError
from kvtier.units import format_size, parse_size


def test_sizes() -> None:
    assert parse_size("64GiB") == 64 * 1024**3
    assert parse_size("10G") == 10 * 1000**3
    assert parse_size("1.5 MiB") == 1572864
    assert parse_size(4096) == 4096
    assert format_size(1536) == "1.5 KiB"
    for bad in ("ten", "5 parsecs", -1, True):
        with pytest.raises(ConfigError):
            parse_size(bad)


def test_precedence_file_env_overrides(tmp_path) -> None:
    path = tmp_path / "kvtier.toml"
    path.write_text('[disk]\ncapacity = "1GiB"\npath = "/data/kv"\n[s3]\nbucket = "from-file"\n')
    config = load_config(path, env={"KVTIER_S3_BUCKET": "from-env", "KVTIER_CHAIN_WRITE_MODE": "write-through"},
                         overrides={"disk": {"capacity": "2GiB"}})
    assert config.disk.capacity == 2 * 1024**3
    assert str(config.disk.path) == "/data/kv"
    assert config.s3.bucket == "from-env"
    assert config.chain.write_mode is WriteMode.WRITE_THROUGH


def test_errors_name_the_field(tmp_path) -> None:
    with pytest.raises(ConfigError, match="disk.capacity"):
        load_config(env={"KVTIER_DISK_CAPACITY": "lots"})
    with pytest.raises(ConfigError, match="KVTIER_DISK_CAPACITY"):
        load_config(env={"KVTIER_DISK_CAPCITY": "1G"})
    with pytest.raises(ConfigError, match="chain.eviction"):
        load_config(overrides={"chain": {"eviction": "random"}})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[disk\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unknown"):
        load_config(overrides={"disk": {"colour": "blue"}})


def test_no_credentials_in_the_model() -> None:
    fields = set(type(load_config(env={}).s3).model_fields)
    assert not {"access_key", "secret_key", "aws_access_key_id", "aws_secret_access_key"} & fields
