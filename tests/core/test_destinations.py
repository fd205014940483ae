"""Where calls may go: prefixes and how a URL is under one, the addresses never allowed or
allowed only when named, the resolver's cache, and the settings of destinations and
secrets, refused at start when malformed or half given."""

import ipaddress

import pytest

from service.core.config import Config, ConfigError, SecretSetting
from service.core.destinations import (
    AllowList,
    CachingResolver,
    NotAllowed,
    Prefix,
    needs_naming,
    never_allowed,
    parse_url,
    prefix_of_template,
    wire_host,
)

SERVERS = {"DATABASE_URL": "postgresql://x/y", "REDIS_URL": "redis://z"}


def allowed(prefix: str, url: str) -> bool:
    return Prefix.parse(prefix).covers(parse_url(url))


@pytest.mark.parametrize(
    "url",
    [
        "http://api.example.com/v1",
        "http://api.example.com/v1/",
        "http://api.example.com/v1/users/5?x=1",
        "http://API.Example.COM/v1/users/5",  # host names compare in lower case
        "http://api.example.com:80/v1/users/5",  # the scheme's default port, written
    ],
)
def test_a_url_under_the_prefix_on_a_segment_boundary_is_allowed(url):
    assert allowed("http://api.example.com/v1", url)


@pytest.mark.parametrize(
    "url",
    [
        "http://api.example.com/v10/users/5",  # not on a segment boundary
        "http://api.example.com/v",
        "http://api.example.com/",
        "http://api.example.com.evil/v1/users/5",  # another host
        "http://evil.api.example.com/v1/users/5",
        "http://api.example.com./v1/users/5",  # a trailing dot is another spelling
        "https://api.example.com/v1/users/5",  # another scheme
        "http://api.example.com:8080/v1/users/5",  # another port
        "http://api.example.com/v1/../admin/5",  # httpx sends /admin/5
        "http://api.example.com/V1/users/5",  # paths compare as written
    ],
)
def test_a_url_outside_the_prefix_is_not(url):
    assert not allowed("http://api.example.com/v1", url)


def test_a_prefix_ending_with_a_slash_allows_only_what_is_below_it():
    assert allowed("http://h/v1/", "http://h/v1/users")
    assert not allowed("http://h/v1/", "http://h/v1")
    assert allowed("http://h", "http://h/anything/at/all")
    assert allowed("http://h/", "http://h/anything")


def test_a_port_is_the_default_one_unless_written_and_star_means_any():
    assert allowed("https://h/", "https://h:443/x")
    assert not allowed("https://h/", "https://h:8443/x")
    assert allowed("http://h:9000/", "http://h:9000/x")
    assert not allowed("http://h:9000/", "http://h/x")
    assert allowed("http://127.0.0.1:*/", "http://127.0.0.1:43121/users/1")
    assert allowed("http://127.0.0.1:*/", "http://127.0.0.1/users/1")
    assert not allowed("http://127.0.0.1:*/", "http://127.0.0.2:43121/users/1")
    assert not allowed("http://127.0.0.1:*/", "https://127.0.0.1:43121/users/1")


def test_an_ip_literal_matches_in_any_of_its_spellings_and_no_other_host():
    assert allowed("http://[::1]:*/", "http://[0:0::1]:5000/x")
    assert not allowed("http://127.0.0.1:*/", "http://127.1:5000/x")
    assert not allowed("http://127.0.0.1:*/", "http://2130706433:5000/x")
    assert not allowed("http://127.0.0.1:*/", "http://localhost:5000/x")


@pytest.mark.parametrize(
    "url,reason",
    [
        ("http://user@api.example.com/v1/x", "user or password"),
        ("http://user:pw@api.example.com/v1/x", "user or password"),
        ("http://api.example.com\\@evil.example/v1/x", "user or password"),
        ("http://api.example.com/v1/%2e%2e/admin", ". or .. segments"),
        ("http://api.example.com/v1/%2E/x", ". or .. segments"),
        ("http://api.example.com/v1/..%2Fadmin", "encoded slash"),
        ("http://api.example.com/v1/a%5cb", "encoded slash or backslash"),
        ("http://api.example.com/v1/..;/admin", ". or .. segments"),
        ("http://api.example.com/v1/.;x=1/admin", ". or .. segments"),
        ("http://api.example.com/v1/%252e%252e/admin", "encoded percent sign"),
        ("ftp://api.example.com/v1/x", "http:// or https://"),
        ("http:///v1/x", "http:// or https://"),
    ],
)
def test_urls_that_could_reach_what_their_text_does_not_show_are_refused(url, reason):
    with pytest.raises(NotAllowed, match=reason):
        AllowList((Prefix.parse("http://api.example.com/"),)).check(url)


@pytest.mark.parametrize(
    "url,reason",
    [
        ("http://169.254.169.254/latest/meta-data", "a cloud metadata address"),
        ("http://169.254.10.20/x", "a link-local address"),
        ("http://[fe80::1]/x", "a link-local address"),
        ("http://[fd00:ec2::254]/x", "a cloud metadata address"),
        ("http://100.100.100.200/x", "a cloud metadata address"),
        ("http://[::ffff:169.254.169.254]/x", "a cloud metadata address"),
        ("http://[::169.254.169.254]/x", "a cloud metadata address"),
        ("http://[64:ff9b:1::a9fe:a9fe]/x", "a cloud metadata address"),
        ("http://metadata.google.internal/computeMetadata/v1", "a cloud metadata name"),
        ("http://metadata/x", "a cloud metadata name"),
        ("http://METADATA.google.internal./x", "a cloud metadata name"),
    ],
)
def test_link_local_and_metadata_destinations_are_refused_whatever_the_prefixes(url, reason):
    # Even a prefix naming it cannot open it: such a prefix refuses the start.
    everything = AllowList((Prefix.parse("http://api.example.com/"),))
    with pytest.raises(NotAllowed, match=f"{reason}, which is never allowed"):
        everything.check(url)
    prefix = url.split("/x")[0].split("/latest")[0].split("/computeMetadata")[0]
    with pytest.raises(ConfigError, match="never allowed"):
        Config(**SERVERS, DOWNSTREAM_URLS=prefix + "/")


@pytest.mark.parametrize(
    "address,kind",
    [
        ("127.0.0.1", "a loopback address"),
        ("127.8.9.10", "a loopback address"),
        ("::1", "a loopback address"),
        ("0.0.0.0", "an unspecified address"),
        ("0.1.2.3", "an unspecified address"),
        ("::", "an unspecified address"),
        ("10.1.2.3", "a private address"),
        ("172.16.0.1", "a private address"),
        ("172.31.255.255", "a private address"),
        ("192.168.1.1", "a private address"),
        ("fc00::1", "a private address"),
        ("fd12:3456::1", "a private address"),
        ("100.64.0.1", "a private address"),
        ("::ffff:10.0.0.1", "a private address"),
        ("64:ff9b::a00:1", "a private address"),  # NAT64 of 10.0.0.1
        ("192.0.2.1", "an address that is not globally reachable"),
    ],
)
def test_local_and_private_addresses_need_a_prefix_that_names_them(address, kind):
    assert needs_naming(ipaddress.ip_address(address)) == kind
    assert never_allowed(ipaddress.ip_address(address)) is None


def test_public_addresses_need_only_a_prefix():
    for address in ("8.8.8.8", "172.32.0.1", "2606:4700::1111"):
        assert needs_naming(ipaddress.ip_address(address)) is None
        assert never_allowed(ipaddress.ip_address(address)) is None


def test_a_prefix_names_an_address_by_its_literal_or_localhost_for_loopback():
    def resolving_to(*addresses):
        return lambda host, port: list(addresses)

    by_literal = AllowList((Prefix.parse("http://10.1.2.3:8080/"),))
    assert by_literal.destination("http://10.1.2.3:8080/x", resolving_to("10.1.2.3")).addresses
    by_localhost = AllowList((Prefix.parse("http://localhost:*/"),))
    loopback = resolving_to("::1", "127.0.0.1")
    assert by_localhost.destination("http://localhost:9000/x", loopback).addresses == (
        "::1",
        "127.0.0.1",
    )
    by_name = AllowList((Prefix.parse("http://partner.example/"),))
    for refused in ("127.0.0.1", "10.0.0.5", "169.254.169.254", "0.0.0.0"):
        with pytest.raises(NotAllowed, match=f"resolves to {refused}, "):
            by_name.destination("http://partner.example/x", resolving_to(refused))
    # One refused address among the answers refuses the name: it could be the one used.
    with pytest.raises(NotAllowed, match="resolves to 10.0.0.5"):
        by_name.destination("http://partner.example/x", resolving_to("8.8.8.8", "10.0.0.5"))
    assert by_name.destination("http://partner.example/x", resolving_to("8.8.8.8")).addresses
    with pytest.raises(NotAllowed, match="never allowed"):
        by_localhost.destination("http://localhost:1/x", resolving_to("169.254.169.254"))


def test_a_private_literal_without_a_prefix_naming_it_is_refused_saying_so():
    with pytest.raises(NotAllowed, match="10.0.0.5, a private address: allowed only by a prefix"):
        AllowList((Prefix.parse("http://10.0.0.6/"),)).check("http://10.0.0.5/x")


def test_an_empty_allow_list_allows_nothing_and_says_how_to_open_it():
    with pytest.raises(NotAllowed, match=r"allowed: none \(DOWNSTREAM_URLS is unset\)"):
        AllowList().check("http://127.0.0.1:9000/users/1")


def test_the_resolver_keeps_an_answer_for_a_few_seconds_per_host():
    asked, now = [], [100.0]

    def system(host, port):
        asked.append(host)
        return ["192.0.2.1" if len(asked) == 1 else "192.0.2.2"]

    resolve = CachingResolver(system, seconds=10, clock=lambda: now[0])
    assert resolve("a.example", 80) == resolve("a.example", 443) == ["192.0.2.1"]
    resolve("b.example", 80)
    assert asked == ["a.example", "b.example"]
    now[0] += 10.5
    assert resolve("a.example", 80) == ["192.0.2.2"]
    assert asked == ["a.example", "b.example", "a.example"]


@pytest.mark.parametrize(
    "template,prefix",
    [
        ("http://127.0.0.1:9000/users/{id}", "http://127.0.0.1:9000/users/"),
        ("https://crm.example/v1/users/{id}/sync", "https://crm.example/v1/users/"),
        ("http://crm.example/x{id}", "http://crm.example/"),
        ("http://crm.example/api?user={id}", "http://crm.example/api"),
    ],
)
def test_processor_http_urls_prefix_ends_before_the_segment_that_holds_the_id(template, prefix):
    made = prefix_of_template(template, "PROCESSOR_HTTP_URL")
    assert made == Prefix.parse(prefix, "PROCESSOR_HTTP_URL")
    settings = Config(**SERVERS, PROCESSOR_HTTP_URL=template)
    assert settings.allow_list.prefixes == (made,)
    assert settings.allow_list.shown == f"{prefix} (PROCESSOR_HTTP_URL)"


@pytest.mark.parametrize(
    "settings,complaint",
    [
        ({"DOWNSTREAM_URLS": "ftp://files.example/"}, "DOWNSTREAM_URLS: 'ftp://files.example/'"),
        ({"DOWNSTREAM_URLS": "http://a.example/?x=1"}, "must not hold a query"),
        ({"DOWNSTREAM_URLS": "http://u:p@a.example/"}, "user or password"),
        ({"DOWNSTREAM_URLS": "http://a.example:x/"}, "not a URL"),
        ({"PROCESSOR_HTTP_URL": "http://169.254.169.254/{id}"}, "PROCESSOR_HTTP_URL names"),
        (
            {"PROCESSOR_HTTP_AUTHORIZATION": "Bearer x"},
            "PROCESSOR_HTTP_AUTHORIZATION is sent only to URLs under PROCESSOR_HTTP_URL's",
        ),
    ],
)
def test_a_malformed_destination_setting_stops_the_start(settings, complaint):
    with pytest.raises(ConfigError, match=complaint.replace("?", r"\?")):
        Config(**SERVERS, **settings)


def test_secrets_are_read_in_pairs_by_name_and_never_shown():
    environ = {
        **SERVERS,
        "DOWNSTREAM_SECRET_PARTNER": "Bearer partner-s3cret",
        "DOWNSTREAM_SECRET_PARTNER_URL": "https://partner.example/v1/",
        "DOWNSTREAM_SECRET_CRM_2": "Basic crm-s3cret",
        "DOWNSTREAM_SECRET_CRM_2_URL": "http://127.0.0.1:*/crm/",
    }
    settings = Config.from_env(environ)
    secrets = settings.downstream_secrets
    assert sorted(secrets) == ["CRM_2", "PARTNER"]
    assert secrets["PARTNER"].value == "Bearer partner-s3cret"
    assert secrets["PARTNER"].covers(parse_url("https://partner.example/v1/users/1"))
    assert not secrets["PARTNER"].covers(parse_url("https://partner.example/v2/users/1"))
    assert secrets["CRM_2"].covers(parse_url("http://127.0.0.1:5000/crm/1"))
    shown = repr(settings) + repr(secrets) + repr(settings.flask_settings()["DOWNSTREAM_SECRETS"])
    assert "s3cret" not in shown


@pytest.mark.parametrize(
    "environ,complaint",
    [
        (
            {"DOWNSTREAM_SECRET_PARTNER": "Bearer s3cret"},
            "DOWNSTREAM_SECRET_PARTNER is set without DOWNSTREAM_SECRET_PARTNER_URL",
        ),
        (
            {"DOWNSTREAM_SECRET_PARTNER_URL": "https://partner.example/"},
            "DOWNSTREAM_SECRET_PARTNER_URL is set without DOWNSTREAM_SECRET_PARTNER,",
        ),
        (
            {"DOWNSTREAM_SECRET_PARTNER": "Bearer s3cret", "DOWNSTREAM_SECRET_PARTNER_URL": " "},
            "DOWNSTREAM_SECRET_PARTNER is set without DOWNSTREAM_SECRET_PARTNER_URL",
        ),
        (
            {"DOWNSTREAM_SECRET_partner": "s3cret", "DOWNSTREAM_SECRET_partner_URL": "http://a/"},
            "DOWNSTREAM_SECRET_partner: a secret's NAME is upper-case letters",
        ),
        (
            {
                "DOWNSTREAM_SECRET_PARTNER": "Bearer s3cret",
                "DOWNSTREAM_SECRET_PARTNER_URL": "http://metadata.google.internal/",
            },
            "DOWNSTREAM_SECRET_PARTNER_URL names a cloud metadata name",
        ),
    ],
)
def test_a_secret_without_its_prefix_or_a_prefix_without_its_secret_stops_the_start(
    environ, complaint
):
    with pytest.raises(ConfigError, match=complaint) as refused:
        Config.from_env({**SERVERS, **environ})
    assert "s3cret" not in str(refused.value)


def test_a_secret_may_be_given_as_settings_too():
    pair = SecretSetting("PARTNER", "Bearer s3cret", "https://partner.example/")
    settings = Config(**SERVERS, secrets=(pair,))
    assert settings.downstream_secrets["PARTNER"].prefix.text == "https://partner.example/"
    assert "s3cret" not in repr(pair)


def test_an_international_name_is_judged_resolved_and_sent_in_its_idna_form():
    """The system's resolver and TLS would encode `straße` by older rules than httpx's
    Host header (`strasse` against `xn--strae-qua`): one spelling must serve all three."""
    asked = []

    def resolve(host, port):
        asked.append(host)
        return ["8.8.8.8"]  # never connected to: only the check runs here

    url = parse_url("https://straße.example/u/1")
    assert wire_host(url) == url.raw_host.decode() == "xn--strae-oqa.example"
    allowed_list = AllowList((Prefix.parse("https://straße.example/"),))
    destination = allowed_list.destination("https://straße.example/u/1", resolve)
    assert asked == ["xn--strae-oqa.example"]
    assert destination.host_header == "xn--strae-oqa.example"
    with pytest.raises(NotAllowed, match="outside DOWNSTREAM_URLS"):
        allowed_list.check("https://strasse.example/u/1")


@pytest.mark.parametrize(
    "variable",
    ["DOWNSTREAM_SECRET_PARTNER", "PROCESSOR_HTTP_AUTHORIZATION"],
)
@pytest.mark.parametrize(
    "value", ["Bearer s3cret\nX-Evil: 1", "Bearer s3cret\x00", "Bearer s3crét"]
)
def test_a_secret_that_cannot_be_a_header_value_stops_the_start_without_showing_it(variable, value):
    # The HTTP library would refuse it at each call with an error quoting it, and that
    # error would be stored as the ID's.
    environ = {
        **SERVERS,
        "PROCESSOR_HTTP_URL": "https://partner.example/users/{id}",
        "DOWNSTREAM_SECRET_PARTNER_URL": "https://partner.example/",
        "DOWNSTREAM_SECRET_PARTNER": "Bearer fine",
        variable: value,
    }
    with pytest.raises(ConfigError, match=f"{variable} must be a header value") as refused:
        Config.from_env(environ)
    assert "s3cr" not in str(refused.value)
