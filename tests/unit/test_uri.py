"""qdb:// URIs, comma-separated host lists and environment variables as ClientConfig."""

from __future__ import annotations

import attrs
import pytest
import trio

import qdb_client
from qdb_client import ClientConfig, ConfigError, Credentials
from qdb_client.config import option_from_text, text_options
from qdb_client.uri import DEFAULT_PORT, QdbUri, Secret, is_uri, parse_uri, split_hosts

from .fake_network import echo

SECRET = "s3cr3t-Pa55"


# ------------------------------------------------------------------ grammar


def test_a_full_uri_maps_to_the_config_fields():
    config = ClientConfig.from_uri(
        "qdb://ada:pw@db1.example:7001,db2.example,[::1]:7003,[fe80::1]"
        "/?request_timeout=2.5&max_retries=5&discover_members=false&client_name=my%20app"
        "&load_balancing=latency_aware&random_seed=42"
    )
    assert config.hosts == (
        "db1.example:7001",
        f"db2.example:{DEFAULT_PORT}",
        "[::1]:7003",
        f"[fe80::1]:{DEFAULT_PORT}",
    )
    assert config.credentials == Credentials(user="ada", password="pw")
    assert config.request_timeout == 2.5 and isinstance(config.request_timeout, float)
    assert config.max_retries == 5 and isinstance(config.max_retries, int)
    assert config.discover_members is False
    assert config.client_name == "my app"
    assert config.load_balancing == "latency_aware"
    assert config.random_seed == 42


def test_defaults_apply_to_what_the_uri_does_not_say():
    config = ClientConfig.from_uri("qdb://h1")
    assert config == ClientConfig(hosts=[f"h1:{DEFAULT_PORT}"])
    assert config.credentials is None


@pytest.mark.parametrize(
    "uri", ["qdb://h1?", "qdb://h1/?", "qdb://h1/", "qdb://h1?&", "qdb://h1/?&&", "QDB://h1"]
)
def test_a_question_mark_without_options_or_a_trailing_slash_is_fine(uri):
    assert ClientConfig.from_uri(uri).hosts == ("h1:7000",)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2", 2.0),
        ("0.5", 0.5),
        (".5", 0.5),
        ("1e1", 10.0),
        (" 3 ", 3.0),
    ],
)
def test_numbers_parse_as_the_fields_type(text, expected):
    value = option_from_text("request_timeout", text)
    assert value == expected and isinstance(value, float)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("TRUE", True), ("1", True), ("false", False), ("False", False), ("0", False)],
)
def test_booleans_are_true_false_1_or_0(text, expected):
    assert option_from_text("discover_members", text) is expected


@pytest.mark.parametrize(
    ("name", "text", "fragment"),
    [
        ("discover_members", "yes", "discover_members must be true, false, 1 or 0"),
        ("request_timeout", "abc", "request_timeout must be a number"),
        ("request_timeout", "nan", "request_timeout must be a number"),
        ("request_timeout", "inf", "request_timeout must be a number"),
        ("request_timeout", "0x10", "request_timeout must be a number"),
        ("request_timeout", "", "request_timeout must be a number"),
        ("max_retries", "1.5", "max_retries must be an integer"),
        ("max_retries", "9" * 41, "max_retries must be an integer"),
        ("random_seed", "seed", "random_seed must be an integer"),
    ],
)
def test_a_value_of_the_wrong_type_names_the_option(name, text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        ClientConfig.from_uri(f"qdb://h1/?{name}={text}")


def test_range_checks_are_the_configs_own_and_say_where_the_value_came_from():
    with pytest.raises(ConfigError, match=r"request_timeout must be from .*\(from the URI\)"):
        ClientConfig.from_uri("qdb://h1/?request_timeout=0")
    with pytest.raises(ConfigError, match=r"max_retries must be within 0\.\.100"):
        ClientConfig.from_uri("qdb://h1/?max_retries=101")
    with pytest.raises(ConfigError, match="load_balancing must be one of"):
        ClientConfig.from_uri("qdb://h1/?load_balancing=random")
    with pytest.raises(ConfigError, match=r"min_connections .* exceeds max_connections"):
        ClientConfig.from_uri("qdb://h1/?min_connections=5&max_connections=2")


def test_random_seed_none_and_strings_as_they_are():
    assert ClientConfig.from_uri("qdb://h1?random_seed=none").random_seed is None
    assert ClientConfig.from_uri("qdb://h1?retry_jitter=full").retry_jitter == "full"


def test_every_field_is_settable_from_text_or_deliberately_not():
    names = {field.name for field in attrs.fields(ClientConfig)}
    assert set(text_options()) | {"hosts", "credentials", "listeners"} == names


@pytest.mark.parametrize("name", text_options())
def test_every_text_option_accepts_its_default_written_as_text(name):
    default = getattr(ClientConfig(hosts=["h:1"]), name)
    if isinstance(default, bool):
        written = "true" if default else "false"
    else:
        written = "none" if default is None else str(default)
    value = option_from_text(name, written)
    assert value == default and type(value) is type(default)


# ------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("qdb://", "names no host"),
        ("qdb:///", "names no host"),
        ("qdb://?request_timeout=2", "names no host"),
        ("qdb://ada:pw@", "names no host"),
        ("qdb://h1,,h2", "empty entry \\(number 2 of 3\\)"),
        ("qdb://h1,", "empty entry"),
        ("qdb://,h1", "empty entry"),
        ("qdb://h1:0", "outside 1..65535"),
        ("qdb://h1:70000", "outside 1..65535"),
        ("qdb://h1:http", "must end in ':port'"),
        ("qdb://h1:", "must end in ':port'"),
        ("qdb://h1:12345678", "must end in ':port'"),
        ("qdb://[::1]x", "':port' must follow the ']'"),
        ("qdb://[nothost]:7000", "is not an IPv6 address"),
        ("qdb://::1", "must be bracketed"),
        ("qdb://h1,h1:7000", "lists the host 'h1:7000' twice"),
        ("qdb://h1:7001,h2,h1:7001", "twice"),
        ("qdb://h 1", "the character ' '"),
        ("http://h1", "the URI scheme is 'http'"),
        ("postgresql://u@h1/db", "the URI scheme is 'postgresql'"),
        ("qdbs://h1", "the URI scheme is 'qdbs'"),
        ("qdb:/h1", "not a qdb URI"),
        ("qdb://h1/db", "has no path"),
        ("qdb://h1?request_timeout=1&request_timeout=2", "'request_timeout' is given twice"),
        ("qdb://h1?request_timeout", "'request_timeout' has no value"),
        ("qdb://h1?=2", "has no name"),
        ("qdb://h1?hosts=h2", "hosts cannot be set as an option"),
        ("qdb://h1?credentials=a", "credentials cannot be set as an option"),
        ("qdb://h1?listeners=a", "listeners cannot be set as an option"),
        ("qdb://h1?client_name=me@home", "raw '@' after its '?'"),
        ("qdb://h1?client_name=%zz", "does not start a %XX escape"),
        ("qdb://h1?client_name=%ff", "not UTF-8"),
    ],
)
def test_bad_uris_are_config_errors_saying_why(uri, fragment):
    with pytest.raises(ConfigError, match=fragment):
        ClientConfig.from_uri(uri)


def test_an_unknown_option_lists_the_known_ones():
    with pytest.raises(ConfigError) as info:
        ClientConfig.from_uri("qdb://h1/?request_timout=2")
    message = str(info.value)
    assert "unknown option 'request_timout'" in message
    assert "request_timeout" in message and "max_retries" in message
    assert "listeners" not in message  # not settable from text, so not offered


def test_option_names_are_exact():
    with pytest.raises(ConfigError, match="unknown option 'Request_Timeout'"):
        ClientConfig.from_uri("qdb://h1?Request_Timeout=2")


def test_whitespace_around_the_uri_hosts_names_and_values_is_ignored():
    config = ClientConfig.from_uri(
        "  qdb://ada:pw@ h1 , h2:7001 /? request_timeout = 2 & client_name = my app \n"
    )
    assert config.hosts == ("h1:7000", "h2:7001")
    assert config.request_timeout == 2.0
    assert config.client_name == "my app"  # inner whitespace is kept


def test_a_plus_is_a_plus_not_a_space():
    assert ClientConfig.from_uri("qdb://h1?client_name=a+b").client_name == "a+b"


# ------------------------------------------------------- user and password


@pytest.mark.parametrize(
    ("userinfo", "user", "password"),
    [
        ("ada:p%40ss%3Aword", "ada", "p@ss:word"),
        ("ada:p@ss:word", "ada", "p@ss:word"),  # raw '@' and ':' still parse
        ("ada:a/b+c=", "ada", "a/b+c="),  # base64-ish, raw '/'
        ("ada:%3F%23%25%2F", "ada", "?#%/"),
        ("ada:", "ada", ""),
        ("ada", "ada", ""),
        ("ad%40a%3Ab:pw", "ad@a:b", "pw"),
        ("%C3%A9mile:%E2%9C%93", "\u00e9mile", "\u2713"),
    ],
)
def test_user_and_password_are_percent_decoded(userinfo, user, password):
    config = ClientConfig.from_uri(f"qdb://{userinfo}@h1:7000/?request_timeout=2")
    assert config.credentials == Credentials(user=user, password=password)
    assert config.hosts == ("h1:7000",)


def test_a_parsed_uri_shows_no_password():
    parsed = parse_uri(f"qdb://ada:{SECRET}@h1?max_retries=1")
    assert isinstance(parsed, QdbUri)
    assert parsed.password == Secret(SECRET) and parsed.password.reveal() == SECRET
    assert SECRET not in repr(parsed)
    assert SECRET not in repr(attrs.asdict(parsed))
    assert parsed.redacted() == "qdb://ada:***@h1:7000/?max_retries=1"


def test_the_password_never_shows_in_the_config():
    config = ClientConfig.from_uri(f"qdb://ada:{SECRET}@h1")
    assert config.credentials is not None and config.credentials.password == SECRET
    assert SECRET not in repr(config)
    assert SECRET not in str(config)
    assert SECRET not in repr(attrs.asdict(config))
    assert SECRET not in str(attrs.asdict(config))
    assert SECRET not in repr(attrs.astuple(config))
    assert SECRET not in repr(config.credentials) and SECRET not in str(Secret(SECRET))


def test_credentials_keep_their_public_shape():
    creds = Credentials(user="ada", password=SECRET)
    assert creds.password == SECRET
    assert creds == Credentials(user="ada", password=SECRET)
    assert hash(creds) == hash(Credentials(user="ada", password=SECRET))
    assert creds != Credentials(user="ada", password="other")
    assert attrs.evolve(creds, password="x").password == "x"
    with pytest.raises(ConfigError, match="password must be a string") as info:
        Credentials(user="ada", password=12345)
    assert "12345" not in str(info.value)


@pytest.mark.parametrize(
    "uri",
    [
        f"qdb://ada:{SECRET}@h1:0",
        f"qdb://ada:{SECRET}@h1,h1",
        f"qdb://ada:{SECRET}@",
        f"qdb://ada:{SECRET}@h1/db",
        f"qdb://ada:{SECRET}@h1?bogus=1",
        f"qdb://ada:{SECRET}@h1?request_timeout=abc",
        f"qdb://ada:{SECRET}@h1?request_timeout=0",
        f"qdb://ada:{SECRET}%zz@h1",
        f"qdb://ada:{SECRET}%ff@h1",
        f"qdb://ada:{SECRET}?x@h1",  # a raw '?' in the password
        f"qdb://ada:{SECRET}?x=1@h1",
        f"qdb://:{SECRET}@h1",
        f"http://ada:{SECRET}@h1",
        f"ada:{SECRET}@qdb://h1",
        f"qdb://ada:{SECRET}@h 1",
    ],
)
def test_no_error_about_a_uri_quotes_its_password(uri):
    with pytest.raises(ConfigError) as info:
        ClientConfig.from_options(uri)
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value)


@pytest.mark.parametrize("hosts", [f"ada:{SECRET}@h1:7000", [f"ada:{SECRET}@h1:7000"]])
def test_user_password_written_in_a_host_list_is_refused_without_echo(hosts):
    with pytest.raises(ConfigError, match="belongs in a qdb:// URI") as info:
        ClientConfig.from_options(hosts)
    assert SECRET not in str(info.value)


# ------------------------------------------------- host lists and open_client


def test_a_comma_separated_string_is_several_hosts():
    assert ClientConfig(hosts="a:1,b:2").hosts == ("a:1", "b:2")
    assert ClientConfig.from_options(" a:1 , [::1]:2 ").hosts == ("a:1", "[::1]:2")
    assert ClientConfig(hosts="a:1").hosts == ("a:1",)


@pytest.mark.parametrize(
    ("hosts", "fragment"),
    [
        ("", "names no host"),
        ("  ", "names no host"),
        ("a:1,,b:2", "empty entry"),
        ("a:1,", "empty entry"),
        ("a:1,a:1", "twice"),
        ("localhost", "has no ':port' \\(a qdb:// URI defaults the port to 7000\\)"),
        ("a:1,b", "has no ':port'"),
        ("a:1;b:2", "'a:1;b:2'"),
    ],
)
def test_bad_host_lists_are_config_errors(hosts, fragment):
    with pytest.raises(ConfigError, match=fragment):
        ClientConfig(hosts=hosts)


def test_a_uri_given_as_hosts_to_the_config_itself_says_where_it_belongs():
    with pytest.raises(ConfigError, match="hosts is a URI"):
        ClientConfig(hosts="qdb://h1")


def test_split_hosts_and_is_uri():
    assert split_hosts("h1, h2:7001", default_port=7000) == ("h1:7000", "h2:7001")
    assert split_hosts("[::1]", default_port=9) == ("[::1]:9",)
    assert is_uri("qdb://h") and is_uri("http://h") and not is_uri("h:1") and not is_uri(None)


def test_keyword_options_override_the_uri():
    config = ClientConfig.from_options(
        "qdb://ada:pw@h1/?request_timeout=2&max_retries=1",
        request_timeout=9.0,
        credentials=("bob", "other"),
    )
    assert config.request_timeout == 9.0
    assert config.max_retries == 1
    assert config.credentials == Credentials(user="bob", password="other")


def test_a_keyword_override_fixes_an_inconsistent_uri():
    config = ClientConfig.from_uri("qdb://h1?min_connections=9", max_connections=10)
    assert (config.min_connections, config.max_connections) == (9, 10)


def test_an_unknown_keyword_is_refused_with_a_uri_too():
    with pytest.raises(ConfigError, match="unknown option"):
        ClientConfig.from_options("qdb://h1", no_such_option=1)


async def test_open_client_takes_a_uri_and_a_host_string(network):
    network.handlers["a:1"] = echo
    network.handlers["b:2"] = echo
    async with qdb_client.open_client("qdb://a:1,b:2/?request_timeout=2") as client:
        assert client.config.hosts == ("a:1", "b:2")
        assert client.config.request_timeout == 2.0
    async with qdb_client.open_client("a:1,b:2", max_retries=1) as client:
        assert client.config.hosts == ("a:1", "b:2")
        assert client.config.max_retries == 1


async def test_open_client_without_hosts_reads_the_environment(network, monkeypatch):
    network.handlers["a:1"] = echo
    monkeypatch.setenv("QDB_HOSTS", "a:1")
    monkeypatch.setenv("QDB_REQUEST_TIMEOUT", "2")
    monkeypatch.delenv("QDB_URL", raising=False)
    async with qdb_client.open_client(max_retries=0) as client:
        assert client.config.hosts == ("a:1",)
        assert client.config.request_timeout == 2.0
        assert client.config.max_retries == 0
    await trio.lowlevel.checkpoint()


# -------------------------------------------------------------- environment


def test_qdb_url_is_the_whole_configuration():
    config = ClientConfig.from_environment({"QDB_URL": "qdb://u:pw@h1?max_retries=1"})
    assert config.hosts == ("h1:7000",) and config.max_retries == 1
    assert config.credentials == Credentials(user="u", password="pw")


def test_qdb_hosts_with_option_user_and_password_variables():
    config = ClientConfig.from_environment(
        {
            "QDB_HOSTS": "h1:7000, h2:7001",
            "QDB_REQUEST_TIMEOUT": "2",
            "QDB_DISCOVER_MEMBERS": "0",
            "QDB_USER": "ada",
            "QDB_PASSWORD": SECRET,
            "QDB_CLUSTER_DIR": "/tmp/elsewhere",  # other QDB_* variables are not options
            "QDB_TEST_LOG_LEVEL": "DEBUG",
        }
    )
    assert config.hosts == ("h1:7000", "h2:7001")
    assert config.request_timeout == 2.0 and config.discover_members is False
    assert config.credentials == Credentials(user="ada", password=SECRET)


def test_empty_variables_count_as_unset():
    config = ClientConfig.from_environment(
        {"QDB_URL": "", "QDB_HOSTS": "h1:1", "QDB_REQUEST_TIMEOUT": " ", "QDB_USER": ""}
    )
    assert config.request_timeout == 5.0 and config.credentials is None


@pytest.mark.parametrize(
    ("environ", "fragment"),
    [
        ({}, "no hosts"),
        ({"QDB_REQUEST_TIMEOUT": "2"}, "no hosts"),
        ({"QDB_URL": "qdb://h1", "QDB_HOSTS": "h2:1"}, "QDB_URL is set, and so is QDB_HOSTS"),
        (
            {"QDB_URL": "qdb://h1", "QDB_REQUEST_TIMEOUT": "2", "QDB_MAX_RETRIES": "1"},
            "and so is QDB_MAX_RETRIES, QDB_REQUEST_TIMEOUT",
        ),
        ({"QDB_URL": "qdb://h1", "QDB_PASSWORD": "x"}, "and so is QDB_PASSWORD"),
        ({"QDB_HOSTS": "qdb://h1"}, "QDB_HOSTS holds a URI"),
        ({"QDB_HOSTS": "h1:1", "QDB_PASSWORD": SECRET}, "QDB_PASSWORD is set but QDB_USER"),
        ({"QDB_HOSTS": "h1:1", "QDB_REQUEST_TIMEOUT": "abc"}, "from QDB_REQUEST_TIMEOUT"),
        ({"QDB_HOSTS": "h1:1", "QDB_REQUEST_TIMEOUT": "0"}, "from QDB_REQUEST_TIMEOUT"),
        ({"QDB_HOSTS": "h1:1,h1:1"}, "twice"),
        ({"QDB_URL": "http://h1"}, "scheme"),
    ],
)
def test_environment_errors_name_the_variable(environ, fragment):
    with pytest.raises(ConfigError, match=fragment) as info:
        ClientConfig.from_environment(environ)
    assert SECRET not in str(info.value)


def test_keywords_override_the_environment():
    environ = {"QDB_HOSTS": "h1:1", "QDB_REQUEST_TIMEOUT": "0", "QDB_MAX_RETRIES": "7"}
    config = ClientConfig.from_environment(environ, request_timeout=1.0)
    assert config.request_timeout == 1.0 and config.max_retries == 7
    url = {"QDB_URL": "qdb://h1?max_retries=7"}
    assert ClientConfig.from_environment(url, max_retries=2).max_retries == 2


def test_explicit_hosts_ignore_the_environment(monkeypatch):
    monkeypatch.setenv("QDB_URL", "qdb://elsewhere?max_retries=9")
    monkeypatch.setenv("QDB_REQUEST_TIMEOUT", "9")
    config = ClientConfig.from_options("h1:1")
    assert config.hosts == ("h1:1",) and config.max_retries == 3 and config.request_timeout == 5.0


def test_from_options_with_no_hosts_reads_os_environ(monkeypatch):
    monkeypatch.setenv("QDB_URL", "qdb://h9:9?max_retries=9")
    for name in ("QDB_HOSTS", "QDB_USER", "QDB_PASSWORD", "QDB_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    config = ClientConfig.from_options(None)
    assert config.hosts == ("h9:9",) and config.max_retries == 9
