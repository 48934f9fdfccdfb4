"""AMQP_URL as a list of a cluster's nodes: parsing, refusals, masking."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from taskbox.broker.connection import NEXT_NODE_PAUSE, FailoverConnection
from taskbox.broker.nodes import parse_amqp_urls, where
from taskbox.broker.settings import BrokerSettings
from taskbox.runtime.settings import describe_invalid, mask_url

ONE = "amqp://u:pw@rabbit1:5672/"
TWO = "amqp://u:pw@rabbit2:5672/"
THREE = "amqps://u:pw@rabbit3:5671/prod"


def test_a_single_url_is_a_list_of_one_and_unchanged() -> None:
    assert parse_amqp_urls(ONE) == (ONE,)
    assert BrokerSettings(amqp_url=ONE).amqp_urls == (ONE,)
    assert BrokerSettings(amqp_url=ONE).amqp_url == ONE


def test_a_comma_in_a_single_urls_password_does_not_split_it() -> None:
    # Only a comma followed by a scheme starts another URL: a URL that worked before
    # the lists works as it did.
    url = "amqp://u:pa,ss@rabbit1:5672/"
    assert parse_amqp_urls(url) == (url,)


@pytest.mark.parametrize(
    "value",
    [f"{ONE},{TWO},{THREE}", f"{ONE}, {TWO} ,{THREE}", f" {ONE},\n {TWO},\n {THREE}\n"],
    ids=["plain", "spaces", "wrapped"],
)
def test_several_urls_are_kept_in_order(value: str) -> None:
    assert parse_amqp_urls(value) == (ONE, TWO, THREE)
    assert BrokerSettings(amqp_url=value).amqp_urls == (ONE, TWO, THREE)


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (f"{ONE},", "starts or ends with a comma"),
        (f",{ONE}", "starts or ends with a comma"),
        (f"{ONE},,{TWO}", "two commas in a row"),
        (f"{ONE},{ONE}", "names the same URL twice"),
        (f"{ONE},AMQP://u:pw@rabbit2:notaport/", "(URL 2 of 2) is not a valid URL"),
        ("amqp://u:pw@rabbit1:5672,rabbit2:5672/", "several hosts in one URL"),
    ],
    ids=["trailing", "leading", "double", "twice", "bad-port", "hosts-in-one-url"],
)
def test_a_bad_list_is_refused_with_a_clear_message(value: str, why: str) -> None:
    with pytest.raises(ValueError, match="AMQP_URL") as caught:
        parse_amqp_urls(value)
    assert why in str(caught.value)
    assert "pw" not in str(caught.value)


def test_a_bad_entry_is_described_per_url_with_every_password_masked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AMQP_URL", "amqp://u:S3cret1@h1:5672/,http://u:S3cret2@h2/")
    with pytest.raises(ValidationError) as caught:
        BrokerSettings(_env_file=None)
    described = describe_invalid(caught.value)
    assert "S3cret" not in described
    assert "amqp://u:***@h1:5672/,http://u:***@h2/" in described
    assert "AMQP_URL (URL 2 of 2) must start with amqp:// or amqps://; got 'http'" in described


def test_mask_url_masks_each_url_of_a_list() -> None:
    assert mask_url(f"{ONE},{TWO}") == "amqp://u:***@rabbit1:5672/,amqp://u:***@rabbit2:5672/"


def test_where_names_host_port_and_vhost_only() -> None:
    assert [where(url) for url in parse_amqp_urls(f"{ONE},{THREE}")] == [
        "rabbit1:5672",
        "rabbit3:5671/prod",
    ]


async def test_a_failover_connection_moves_to_the_next_node_after_each_loss() -> None:
    # No broker: _move_on is what _on_connection_close runs for each failed attempt or
    # lost connection; the next attempt connects to self.url.
    urls = [ONE, TWO, THREE]
    connection = FailoverConnection(urls)
    full = connection.reconnect_interval
    assert str(connection.url) == ONE
    seen = []
    for _ in range(4):
        connection._move_on()
        seen.append((connection.node, connection.reconnect_interval))
    # The next two nodes right away; after a whole round of failures, the full interval.
    assert seen == [
        ("rabbit2:5672", NEXT_NODE_PAUSE),
        ("rabbit3:5671/prod", NEXT_NODE_PAUSE),
        ("rabbit1:5672", full),
        ("rabbit2:5672", NEXT_NODE_PAUSE),
    ]
    assert str(connection.url) == TWO
    await connection.close()
