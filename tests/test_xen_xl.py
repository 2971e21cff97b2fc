"""The xl calls of the primary: the domain's libxl configuration from ``xl list -l`` (against a
fake xl, ``tests/fake_xl.py``), and ``assemble`` putting it in the session details."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from remus.errors import DomainError, XlError
from remus.xen import xl
from tests.fake_xl import fake_xl  # noqa: F401 - a fixture
from tests.fake_xl import fake_xl_state as state
from tests.xen_stream import CONFIG


def test_domain_config_is_the_config_of_xl_list_l(fake_xl: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = {"c_info": {"name": "domu", "uuid": "0b7f"}, "b_info": {"max_memkb": 131072}}
    monkeypatch.setenv("FAKE_XL_LIST", json.dumps([{"domid": 4, "config": config}], indent=4))
    text = xl.domain_config(4)
    assert json.loads(text) == config and "\n" not in text
    assert state(fake_xl)["calls"] == [["list", "-l", "4"]]


@pytest.mark.parametrize("listing, needle", [
    ("[]", "xl has no configuration for domain 4"),
    ('[{"domid": 9, "config": {}}]', "xl has no configuration for domain 4"),
    ("(domain (domid 4))", "did not print JSON .*output_format"),
])
def test_domain_config_says_why_there_is_none(fake_xl: Path, monkeypatch: pytest.MonkeyPatch,
                                              listing: str, needle: str) -> None:
    monkeypatch.setenv("FAKE_XL_LIST", listing)
    with pytest.raises(XlError, match=needle):
        xl.domain_config(4)


def test_assemble_puts_the_config_in_the_session_details() -> None:
    from remus.xen.domain import assemble
    from tests.test_xen_domain import TREE, AssemblyControl, AssemblyStore, no_channel

    asked: list[int] = []

    def read_config(domid: int) -> str:
        asked.append(domid)
        return CONFIG

    domain = assemble("web", AssemblyStore(dict(TREE)), AssemblyControl(), no_channel, read_config=read_config)
    domain.close()
    assert asked == [4] and domain.info.details["libxl_config"] == CONFIG


@pytest.mark.parametrize("problem, needle", [
    ("unreadable", "cannot read the configuration of domain web, which the backup needs to recreate "
                   "it: `xl list -l 4` failed: no"),
    ("huge", "the configuration of domain web takes 7[0-9]{4} bytes in the session record, more than "
             "the 61440 it can carry"),
])
def test_assemble_refuses_a_domain_whose_config_cannot_travel(problem: str, needle: str) -> None:
    from remus.xen.domain import assemble
    from tests.test_xen_domain import TREE, AssemblyControl, AssemblyStore, no_channel

    def read_config(domid: int) -> str:
        if problem == "unreadable":
            raise XlError(f"`xl list -l {domid}` failed: no")
        return json.dumps({"c_info": {"name": "web"}, "padding": "x" * 70000})

    with pytest.raises(DomainError, match=needle):
        assemble("web", AssemblyStore(dict(TREE)), AssemblyControl(), no_channel, read_config=read_config)
