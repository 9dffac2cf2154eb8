"""Remote input the master checks with a pattern must match it whole: with ``re.match`` and
``^...$`` a trailing newline slipped through, so a proxy token could name ``"host\\n"`` (a name the
master then signs into a proxy's certificate) and a release could shard by ``"20%\\n"``. Attacked
here through the REST API of a real master; the refusals are 422, as for any invalid request."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fleet import Fleet
from hcsdk.common.errors import RequestError


@pytest.fixture(scope="module")
def fl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path_factory.mktemp("newline"))
    fleet.start_master()
    try:
        yield fleet
    finally:
        fleet.close()


@pytest.mark.parametrize("name", ["host\n", "proxy.example.com\n", "host\r\n", "host\nevil.example.com"])
def test_a_proxy_token_for_a_name_with_a_newline_is_refused(fl: Fleet, name: str) -> None:
    with pytest.raises(RequestError, match="is not a host name or IP address") as err:
        fl.client.create_join_token(ttl=600, kind="proxy", proxy_names=[name])
    assert err.value.status == 422  # refused as every invalid request is (RequestRejected)
    # the same name without the newline is a proxy name like any other
    token = fl.client.create_join_token(ttl=600, kind="proxy", proxy_names=[name.split("\r")[0].split("\n")[0]])
    assert token["proxy_names"] == [name.split("\r")[0].split("\n")[0]]


@pytest.mark.parametrize("option", ["batch", "max_failures"])
@pytest.mark.parametrize("share", ["20%\n", "20%\r\n", "20\n%"])
def test_a_share_with_a_newline_is_refused(fl: Fleet, option: str, share: str) -> None:
    with pytest.raises(RequestError, match=f"{option}=.*give a number or a percentage") as err:
        fl.client.release("no-such-artifact", "label:role=none", dest="/tmp/x", **{option: share})  # type: ignore[arg-type]
    assert err.value.status == 422


def test_a_share_without_one_gets_past_the_check(fl: Fleet) -> None:
    """The control: "20%" is a share, so the master goes on to look the artifact up."""
    with pytest.raises(RequestError, match="no artifact 'no-such-artifact'") as err:
        fl.client.release("no-such-artifact", "label:role=none", dest="/tmp/x", batch="20%", max_failures="5%")
    assert err.value.status == 404
