"""Redis URLs: parsed into an address whose password never shows in text (pure)."""

from __future__ import annotations

import pytest

from teltonika.redis.connect import RedisAddress, RedisURLError, parse_redis_url


def test_password_is_parsed_but_never_shown() -> None:
    """The password reaches the connection, but neither str() nor repr() prints it."""
    address = parse_redis_url("rediss://app:s3cr%40t@redis.example:6380/2")
    assert isinstance(address, RedisAddress)
    assert (address.username, address.password, address.port, address.db, address.tls) == (
        "app",
        "s3cr@t",
        6380,
        2,
        True,
    )
    for text in (str(address), repr(address), repr([address])):
        assert "s3cr" not in text
    assert "password='***'" in repr(address)
    assert "password=None" in repr(RedisAddress())


@pytest.mark.parametrize(
    "url",
    [
        "http://user:s3cret@host:6379/0",
        "redis://user:s3cret@host:port/0",
        "redis://:s3cret@host:99999999/0",
        "redis://user:s3/cret@host:6379/0",
        "redis://:1234/s3cret@host/0",
        "redis://:s3cret/5@host/0",
        "redis://u:s3cr?et@host/0",
        "redis://u:s3cr#et@host/0",
        "redis://u:s3@cr/et@host/0",
        "redis://u:s3cret@host/x",
        "redis+sentinel://:s3/cret@h1:26379,h2:26379/mymaster",
        "redis+sentinel://u:s3cr?et@h1:26379/mymaster",
        "redis+sentinel://u:s3cret@h1:26379/mymaster/x",
        "redis+sentinel://h1:26379/mymaster?sentinel_password=s3cret&x=1",
    ],
)
def test_errors_do_not_carry_the_password(url: str) -> None:
    """A URL refused for its scheme, port or db is quoted in the error without its
    password, also when the password holds an unencoded '/', '?', '#' or '@' (then the
    URL is refused: it cannot be parsed as meant)."""
    with pytest.raises(RedisURLError) as info:
        parse_redis_url(url)
    assert "s3cret" not in str(info.value) and "***" in str(info.value)


def test_redact_url_leaves_urls_without_a_password_alone() -> None:
    from teltonika.redis.connect import redact_url

    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"
    assert redact_url("redis://user@host/0") == "redis://user@host/0"
    assert redact_url("nonsense") == "nonsense"
    assert redact_url("redis://u:p@ss@host/1") == "redis://u:***@host/1"
    assert redact_url("redis://u:p/a?s#s@host/1") == "redis://u:***@host/1"


def test_an_encoded_password_parses_and_never_shows() -> None:
    """A percent-encoded password with URL-special characters parses to the real password,
    which neither the address's str() nor its repr() shows."""
    address = parse_redis_url("redis://u:s3%2Fc%40r%3Fe%23t@host:6380/2")
    assert isinstance(address, RedisAddress)
    assert address.password == "s3/c@r?e#t"
    assert (address.host, address.port, address.db) == ("host", 6380, 2)
    assert "s3" not in repr(address) and "s3" not in str(address)
