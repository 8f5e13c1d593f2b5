from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.config import DEFAULTS_FILE, ConfigError, load_config


def test_defaults_load_and_document_every_key():
    cfg = load_config(env={})
    assert cfg.funnel.light_k == 500 and cfg.funnel.heavy_k == 50 and cfg.funnel.page_size == 20
    assert cfg.heads.negative < 0
    assert cfg.rerank.max_consecutive_author == 3 and cfg.rerank.min_out_of_network == pytest.approx(0.2)
    assert cfg.events.uri.startswith("kafka://")  # Kafka is the default transport
    assert cfg.sim.scales["small"].users == 5000


def test_env_overrides_coerce_and_validate():
    cfg = load_config(env={"FEEDRANK_FUNNEL_LIGHT_K": "300", "FEEDRANK_EVENTS": "kafka://127.0.0.1:9999/t",
                           "FEEDRANK_EVENTS_FSYNC": "false", "FEEDRANK_SIM_SCALES_SMALL_USERS": "2000",
                           "FEEDRANK_SIM_TREND_SHIFTS": '[{"topic": 1, "at_day": 2, "boost": 1.0}]'})
    assert cfg.funnel.light_k == 300
    assert cfg.events.uri == "kafka://127.0.0.1:9999/t"
    assert cfg.events.fsync is False
    assert cfg.sim.scales["small"].users == 2000
    assert cfg.sim.trend_shifts[0].topic == 1


@pytest.mark.parametrize(
    "env, key",
    [
        ({"FEEDRANK_FUNNEL_LIGHT_K": "-5"}, "funnel.light_k"),
        ({"FEEDRANK_FUNNEL_HEAVY_K": "900"}, "funnel"),
        ({"FEEDRANK_HEADS_NEGATIVE": "1.0"}, "heads.negative"),
        ({"FEEDRANK_EVENTS": "s3://bucket"}, "events.uri"),
        ({"FEEDRANK_EVENTS": "kafka://host-without-port/x"}, "events.uri"),
        ({"FEEDRANK_REDIS_MAXMEMORY": "1gb", "FEEDRANK_REDIS": "http://x"}, "redis.uri"),
        ({"FEEDRANK_ONLINE_LEARNING_LR": "0.01"}, "online_learning"),
        ({"FEEDRANK_SIM_SCALE": "huge"}, "sim"),
        ({"FEEDRANK_EVENTS_FSYNC": "maybe"}, "FEEDRANK_EVENTS_FSYNC"),
        ({"FEEDRANK_FUNNEL_LIGHTK": "5"}, "FEEDRANK_FUNNEL_LIGHTK"),
    ],
)
def test_invalid_values_fail_naming_the_key(env, key):
    with pytest.raises(ConfigError) as e:
        load_config(env=env)
    assert key in str(e.value)


def test_config_file_is_merged_on_top(tmp_path: Path):
    extra = tmp_path / "prod.toml"
    extra.write_text("[funnel]\nlight_k = 800\n[serving]\nport = 6000\n")
    cfg = load_config(env={"FEEDRANK_CONFIG": str(extra)})
    assert cfg.funnel.light_k == 800 and cfg.serving.port == 6000 and cfg.funnel.heavy_k == 50


def test_unknown_key_in_file_is_rejected(tmp_path: Path):
    extra = tmp_path / "typo.toml"
    extra.write_text("[funnel]\nlite_k = 800\n")
    with pytest.raises(ConfigError, match="funnel.lite_k"):
        load_config(env={"FEEDRANK_CONFIG": str(extra)})


def test_relative_paths_resolve_against_project_root():
    cfg = load_config(env={})
    assert cfg.data_dir == DEFAULTS_FILE.parent / "var"
    assert cfg.resolve_uri("file://var/events") == "file://" + str(DEFAULTS_FILE.parent / "var" / "events")
    assert cfg.resolve_uri("file:///abs/x") == "file:///abs/x"


def test_cli_fails_fast_naming_the_key():
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEEDRANK_")}
    env["FEEDRANK_FUNNEL_PAGE_SIZE"] = "-1"
    r = subprocess.run([sys.executable, "-m", "feedrank.cli", "up"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "funnel.page_size" in r.stderr and "greater than 0" in r.stderr
