"""node.config: defaults, precedence, validation messages, derived addresses, examples."""

import argparse
import dataclasses
from pathlib import Path

import pytest

from node import config
from node.config import ConfigError, NodeConfig, load

REPO = Path(__file__).resolve().parent.parent


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return parser.parse_args(list(argv))


def write_toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return str(path)


def test_defaults_without_any_source():
    cfg = load(parse(), environ={})
    assert cfg == NodeConfig()
    assert cfg.listen == "127.0.0.1:7400"
    assert cfg.mailbox_len_max == 1024
    assert cfg.supervision == "restart"
    assert cfg.seeds == ()


def test_flags_default_to_none_so_absence_is_visible():
    args = parse()
    for f in dataclasses.fields(NodeConfig):
        assert getattr(args, f.name) is None, f.name
    assert args.config is None


def test_precedence_file_then_env_then_flags(tmp_path):
    path = write_toml(tmp_path, 'mailbox_len_max = 10\nmax_hops = 3\nlog_level = "debug"\n'
                                "restart_limit = 7\n")
    env = {"SYNTHESIS_MAILBOX_LEN_MAX": "20", "SYNTHESIS_MAX_HOPS": "4"}
    cfg = load(parse("--config", path, "--mailbox-len-max", "30"), environ=env)
    assert cfg.mailbox_len_max == 30      # flag beats env and file
    assert cfg.max_hops == 4              # env beats file
    assert cfg.log_level == "debug"       # file beats default
    assert cfg.restart_limit == 7
    assert cfg.agents_max == 1000000      # default


def test_config_path_from_environment(tmp_path):
    path = write_toml(tmp_path, "agents_max = 5\n")
    assert load(None, environ={"SYNTHESIS_CONFIG": path}).agents_max == 5


def test_empty_environment_variable_counts_as_unset():
    assert load(None, environ={"SYNTHESIS_MAILBOX_LEN_MAX": ""}).mailbox_len_max == 1024


@pytest.mark.parametrize("key, raw", [
    ("mailbox_len_max", "abc"), ("mailbox_len_max", "0"), ("agents_max", "1.5"),
    ("max_message_bytes", "-1"), ("max_hops", "99"), ("restart_limit", "-1"),
    ("handler_timeout_s", "0"), ("handler_timeout_s", "nan"), ("gossip_interval_s", "x"),
    ("restart_backoff_s", "-0.1"), ("executor_workers", "0"), ("pub_hwm", "0"),
    ("supervision", "reboot"), ("log_level", "verbose"), ("log_format", "xml"),
    ("listen", "localhost"), ("listen", "h:65536"), ("listen", ":7400"), ("listen", "h:70000"),
    ("advertise", "h:x"), ("pub", "h:-1"), ("metrics", "on"), ("seeds", "a:1,b"),
    ("seeds", "a:0"),
    ("behaviors", "my-module"), ("node_id", "has space"),
])
def test_each_bad_environment_value_names_key_and_source(key, raw):
    env_var = config.env_name(key)
    with pytest.raises(ConfigError) as info:
        load(None, environ={env_var: raw})
    assert info.value.key == key
    message = str(info.value)
    assert message.startswith(f"{key}: must be ")
    assert repr(raw) in message or raw.split(",")[-1] in message
    assert message.endswith(f"(from {env_var})")


def test_error_message_matches_documented_shape():
    with pytest.raises(ConfigError) as info:
        load(None, environ={"SYNTHESIS_MAILBOX_LEN_MAX": "abc"})
    assert str(info.value) == ("mailbox_len_max: must be an integer >= 1, got 'abc' "
                               "(from SYNTHESIS_MAILBOX_LEN_MAX)")


def test_bad_flag_names_the_flag():
    with pytest.raises(ConfigError, match=r"\(from --max-hops\)") as info:
        load(parse("--max-hops", "zero"), environ={})
    assert info.value.key == "max_hops"


@pytest.mark.parametrize("text, key", [
    ('mailbox_len_max = "many"\n', "mailbox_len_max"),
    ("mailbox_len_max = true\n", "mailbox_len_max"),
    ("mailbox_len_max = 2.5\n", "mailbox_len_max"),
    ("node_id = 5\n", "node_id"),
    ("seeds = [1, 2]\n", "seeds"),
])
def test_bad_toml_types_name_key_and_file(tmp_path, text, key):
    path = write_toml(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(parse("--config", path), environ={})
    assert info.value.key == key
    assert path in str(info.value)


def test_unknown_toml_key_is_an_error_with_a_suggestion(tmp_path):
    path = write_toml(tmp_path, "mailbox_len_mx = 5\n")
    with pytest.raises(ConfigError, match="did you mean 'mailbox_len_max'") as info:
        load(parse("--config", path), environ={})
    assert info.value.key == "mailbox_len_mx"


def test_missing_or_broken_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(parse("--config", str(tmp_path / "absent.toml")), environ={})
    assert info.value.key == "config"
    path = write_toml(tmp_path, "listen = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(parse("--config", path), environ={})


def test_toml_accepts_native_types(tmp_path):
    path = write_toml(tmp_path, 'handler_timeout_s = 2\nseeds = ["127.0.0.1:7400"]\n'
                                'behaviors = ["pkg.mod", "other"]\n')
    cfg = load(parse("--config", path), environ={})
    assert cfg.handler_timeout_s == 2.0 and isinstance(cfg.handler_timeout_s, float)
    assert cfg.seeds == ("tcp://127.0.0.1:7400",)
    assert cfg.behaviors == ("pkg.mod", "other")


def test_derived_addresses_from_listen():
    cfg = load(parse("--listen", "tcp://10.0.0.5:7410", "--curve", "off"), environ={})
    assert cfg.listen == "10.0.0.5:7410"
    assert cfg.router_bind == "tcp://10.0.0.5:7410"
    assert cfg.router_endpoint == "tcp://10.0.0.5:7410"
    assert cfg.pub_bind == "tcp://10.0.0.5:7411"
    assert cfg.pub_endpoint == "tcp://10.0.0.5:7411"
    assert cfg.metrics_address == ("10.0.0.5", 9410)
    assert cfg.resolved_node_id == "10.0.0.5:7410"


def test_derived_addresses_with_advertise_pub_and_metrics():
    cfg = NodeConfig(listen="0.0.0.0:7400", advertise="node1.example:7400",
                     pub="0.0.0.0:8000", metrics="127.0.0.1:9000", node_id="n1", curve="off")
    assert cfg.router_bind == "tcp://0.0.0.0:7400"
    assert cfg.router_endpoint == "tcp://node1.example:7400"
    assert cfg.pub_bind == "tcp://0.0.0.0:8000"
    assert cfg.pub_endpoint == "tcp://node1.example:8000"
    assert cfg.metrics_address == ("127.0.0.1", 9000)
    assert cfg.resolved_node_id == "n1"
    assert NodeConfig(metrics="off").metrics_address is None
    assert NodeConfig(advertise="h:1").resolved_node_id == "h:1"


def test_listen_port_0_derives_port_0_pub_and_metrics():
    """Port 0 binds a free port; "listen port + 1" of 0 would be port 1, so the
    derived PUB and metrics addresses take port 0 (a free port each) too."""
    cfg = load(parse("--listen", "127.0.0.1:0", "--ready-file", "/run/n.json"), environ={})
    assert cfg.router_bind == "tcp://127.0.0.1:0"
    assert cfg.pub_bind == "tcp://127.0.0.1:0"
    assert cfg.metrics_address == ("127.0.0.1", 0)
    assert cfg.ready_file == "/run/n.json"
    assert NodeConfig(listen="127.0.0.1:0", metrics="off").metrics_address is None
    explicit = NodeConfig(listen="127.0.0.1:0", pub="127.0.0.1:7001", metrics="h:9000")
    assert explicit.pub_bind == "tcp://127.0.0.1:7001"
    assert explicit.metrics_address == ("h", 9000)


def test_bound_config_carries_the_bound_ports():
    """Once bound, the advertised endpoints and a derived node id have real ports;
    an explicit node id stays, and a derived metrics address still binds port 0."""
    cfg = NodeConfig(listen="127.0.0.1:0")
    assert cfg.resolved_node_id == "127.0.0.1:0"   # provisional, until bound
    bound = cfg.bound("tcp://127.0.0.1:41000", "tcp://127.0.0.1:41007")
    assert bound.router_endpoint == "tcp://127.0.0.1:41000"
    assert bound.pub_endpoint == "tcp://127.0.0.1:41007"
    assert bound.resolved_node_id == "127.0.0.1:41000"
    assert bound.metrics_address == ("127.0.0.1", 0)
    named = NodeConfig(listen="0.0.0.0:0", advertise="node1.example:0", node_id="n1",
                       curve="off")
    bound = named.bound("tcp://node1.example:41000", "tcp://node1.example:41001")
    assert bound.resolved_node_id == "n1"
    assert bound.pub_bind == "tcp://0.0.0.0:41001"
    assert bound.router_endpoint == "tcp://node1.example:41000"


def test_ipv6_addresses_keep_brackets():
    cfg = NodeConfig(listen="[::1]:7400")
    assert cfg.router_bind == "tcp://[::1]:7400"
    assert cfg.pub_bind == "tcp://[::1]:7401"


@pytest.mark.parametrize("kwargs, key", [
    ({"listen": "0.0.0.0:7400"}, "advertise"),
    ({"listen": "h:65535"}, "pub"),
    ({"listen": "h:64000", "pub": "h:64001"}, "metrics"),
    ({"listen": "h:7400", "pub": "h:7400"}, "pub"),
    ({"listen": "h:7400", "metrics": "h:7401"}, "metrics"),
    ({"restart_backoff_s": 2.0, "restart_backoff_max_s": 1.0}, "restart_backoff_max_s"),
])
def test_cross_field_rules_name_the_key(kwargs, key):
    with pytest.raises(ConfigError) as info:
        NodeConfig(**kwargs)
    assert info.value.key == key


def test_cross_field_error_from_load_names_the_source():
    with pytest.raises(ConfigError, match=r"\(from --pub\)"):
        load(parse("--listen", "h:7400", "--pub", "h:7400"), environ={})


def test_seeds_normalised_deduplicated_and_merged_from_flag_forms():
    args = parse("--seed", "127.0.0.1:7400", "--seeds", "tcp://h:7410, h:7420,,",
                 "--seed", "127.0.0.1:7400")
    cfg = load(args, environ={})
    assert cfg.seeds == ("tcp://127.0.0.1:7400", "tcp://h:7410", "tcp://h:7420")
    env = {"SYNTHESIS_SEEDS": "a:1,tcp://b:2", "SYNTHESIS_BEHAVIORS": "x.y,z"}
    cfg = load(None, environ=env)
    assert cfg.seeds == ("tcp://a:1", "tcp://b:2")
    assert cfg.behaviors == ("x.y", "z")


def test_choices_are_case_insensitive():
    cfg = load(None, environ={"SYNTHESIS_LOG_LEVEL": "WARNING", "SYNTHESIS_SUPERVISION": "Stop"})
    assert (cfg.log_level, cfg.supervision) == ("warning", "stop")


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        NodeConfig().listen = "h:1"  # type: ignore[misc]


def test_describe_covers_every_field_and_docs_are_current():
    rows = config.describe()
    assert [r[0] for r in rows] == [f.name for f in dataclasses.fields(NodeConfig)]
    assert all(r[3] for r in rows)
    doc = (REPO / "docs" / "CONFIG.md").read_text()
    assert doc == config.render_markdown(), "run: python -m node.config > docs/CONFIG.md"


def example_tomls():
    return sorted((REPO / "configs").glob("*.toml"))


def test_examples_exist():
    names = {p.name for p in example_tomls()}
    assert {"node.example.toml", "cluster-a.toml", "cluster-b.toml", "cluster-c.toml"} <= names


@pytest.mark.parametrize("path", example_tomls(), ids=lambda p: p.name)
def test_every_example_toml_loads(path):
    cfg = load(parse("--config", str(path)), environ={})
    assert isinstance(cfg, NodeConfig)


def test_node_example_lists_every_key_with_its_default():
    cfg = load(parse("--config", str(REPO / "configs" / "node.example.toml")), environ={})
    assert cfg == NodeConfig()
    text = (REPO / "configs" / "node.example.toml").read_text()
    for f in dataclasses.fields(NodeConfig):
        assert f"\n{f.name} = " in text, f.name


def test_cluster_examples_form_a_cluster():
    cfgs = [load(parse("--config", str(REPO / "configs" / f"cluster-{x}.toml")), environ={})
            for x in "abc"]
    assert [c.listen for c in cfgs] == ["127.0.0.1:7400", "127.0.0.1:7410", "127.0.0.1:7420"]
    assert [c.metrics_address[1] for c in cfgs] == [9400, 9410, 9420]
    assert cfgs[0].seeds == ()
    assert cfgs[1].seeds == cfgs[2].seeds == ("tcp://127.0.0.1:7400",)


@pytest.mark.parametrize("node_id, ok", [
    ("é" * 127, True),        # 254 bytes of UTF-8
    ("é" * 128, False),       # 256 bytes: peer frames could not carry it
    ("a\ud800", False),       # a lone surrogate is not UTF-8
    ("tab\there", False),
    ("bell\x07", False),
])
def test_node_id_fits_a_peer_frame(node_id, ok):
    if ok:
        assert NodeConfig(node_id=node_id).node_id == node_id
    else:
        with pytest.raises(ConfigError) as err:
            NodeConfig(node_id=node_id)
        assert err.value.key == "node_id"


def test_bridges_need_tls_where_their_peers_must_authenticate():
    with pytest.raises(ConfigError, match="QUIC needs TLS"):
        NodeConfig(quic="127.0.0.1:0")
    with pytest.raises(ConfigError, match="go together"):
        NodeConfig(http2="127.0.0.1:0", tls_cert="c.pem")
    with pytest.raises(ConfigError, match="h2c"):
        NodeConfig(http2="10.0.0.5:7480", listen="10.0.0.5:7400", curve_secret="s",
                   curve_peers="p")
    with pytest.raises(ConfigError, match="with CURVE on"):
        NodeConfig(http2="127.0.0.1:0", curve_secret="s", curve_peers="p")
    with pytest.raises(ConfigError, match="listen port"):
        NodeConfig(http2="127.0.0.1:7400")
    ok = NodeConfig(http2="127.0.0.1:0", curve_secret="s", curve_peers="p", tls_cert="c",
                    tls_key="k", tls_ca="a")
    assert ok.curve_enabled and ok.http2 == "127.0.0.1:0"
